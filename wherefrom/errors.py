"""User-facing errors. Every bad input raises one of these with a message that
says what was wrong and what to do; the CLI prints it on one line and exits 2."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import jsonargparse


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


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` for wherefrom's commands with subcommands (``lds``, ``ensemble``) or a ``--config``
    of their own (a benchmark file): a usage error raises a one-line :class:`WherefromError` (the
    CLI prints it and exits 2) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise WherefromError(f"{message}; see `{self.prog} --help`")


class ConfigArgumentParser(jsonargparse.ArgumentParser):
    """jsonargparse for wherefrom's flat commands, as for ``fit``: ``--config file.yaml`` (its keys are the
    options, e.g. ``top_k: 8``; later flags override it) and ``--print_config``; a usage error raises a
    one-line :class:`WherefromError` instead of printing the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, exit_on_error=False, **kwargs)
        self.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a YAML/JSON file of these options (flags after it override it)")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        head, sep, keys = message.partition("the following arguments are required: ")
        if sep:  # jsonargparse names the keys; name the flags, as argparse does
            message = head + sep + ", ".join("--" + k.strip().replace("_", "-") for k in keys.split(","))
        raise WherefromError(f"{message}; see `{self.prog} --help`")
