"""User-facing errors. Every bad input raises one of these with a message that
says what was wrong and what to do; the CLI prints it on one line and exits 2.

Library code names its options as keyword arguments; a front end that spells them otherwise
passes a :data:`Spell` (the CLI: its flags; a callback: :func:`keyword` of its class)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Spell = Callable[[str], str]  # how the caller's option is written in a message: "denoiser" -> "TRAKFeatures(denoiser=...)"


def keyword(owner: str) -> Spell:
    """Options spelled as keyword arguments of ``owner`` (a callback, attributor or config)."""
    return lambda argument: f"{owner}({argument}=...)"


def check_choices(config: Any) -> None:
    """Refuse a field of the dataclass ``config`` outside the ``choices`` of its metadata (an enum or a
    tuple of values); an enum member given for a field is kept as its value."""
    for f in dataclasses.fields(config):
        if "choices" not in f.metadata:
            continue
        allowed = [getattr(k, "value", k) for k in f.metadata["choices"]]
        given = getattr(config, f.name)
        value = getattr(given, "value", given)
        if value not in allowed:
            raise WherefromError(f"{f.name} must be one of {allowed}, got {given!r}")
        object.__setattr__(config, f.name, value)


def one_line(error: BaseException, limit: int = 150) -> str:
    """An exception's message on one line (whitespace collapsed), cut to ``limit`` characters."""
    return " ".join(str(error).split())[:limit]


class WherefromError(ValueError):
    """Bad user input or an inconsistent artifact (store, checkpoint, split)."""


class FingerprintMismatchError(WherefromError):
    """An artifact was made for another dataset split, codes or config."""


class CheckpointError(WherefromError):
    """A checkpoint is missing, unreadable, or belongs to another architecture."""


class StoreDamagedError(WherefromError):
    """A store file does not match its manifest (truncated, overwritten, missing)."""
