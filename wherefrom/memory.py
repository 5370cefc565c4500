"""Memory budgets: how many rows a pass forms at once.

Every pass that evaluates the network on (example, draw) pairs (featurisation, stored rows,
exact mode, query gradients, factor passes, measurements) forms them in chunks whose working
set fits a budget and accumulates sums, so peak memory is set by the budget, never by
batch x draws x model size. Chunking changes nothing but float rounding: every pass is a sum
over pairs.

The budget is what :func:`set_budget` (or :func:`budget_limit`) gave, else derived from the
device: half the free memory of a CUDA device, :data:`DEFAULT_CPU_BUDGET` on the CPU. A pass
gives half of it to the network's activations (:func:`activation_bytes` per row, measured once
per network and input shape) and a quarter to dense ``B x P`` gradients (:func:`gradient_rows`).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from wherefrom.errors import WherefromError

DEFAULT_CPU_BUDGET = 1 << 30  # bytes of working set on the CPU, beyond the model and the process
ACTIVATION_FACTOR = 3  # peak of forward + backward (vmap's per-example grads, temporaries) over the saved tensors: a margin (benchmarks/results/bench_memory.md)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

_budget: int | None = None
_row_bytes: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def parse_bytes(text: str | int) -> int:
    """``"4GiB"``, ``"512MB"``, ``"2e9"`` or an int, as a positive number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text).lower())
        if m is None:
            raise WherefromError(f"memory budget {text!r} is not a size; give bytes with a unit, e.g. 4GiB or 512MB")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value <= 0:
        raise WherefromError(f"memory budget must be positive, got {text!r}")
    return value


def set_budget(nbytes: int | str | None) -> None:
    """Set the working-set budget of every pass in this process (``None``: derived from the device)."""
    global _budget
    _budget = None if nbytes is None else parse_bytes(nbytes)


@contextlib.contextmanager
def budget_limit(nbytes: int | str | None) -> Iterator[None]:
    """:func:`set_budget` for the duration of a ``with`` block."""
    previous = _budget
    set_budget(nbytes)
    try:
        yield
    finally:
        set_budget(previous)


def budget(device: torch.device | str | None = None) -> int:
    """The working-set budget in bytes for passes on ``device``."""
    if _budget is not None:
        return _budget
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 2, 1)
    return DEFAULT_CPU_BUDGET


def activation_bytes(model: nn.Module, forward: Callable[[int], Tensor], key: tuple) -> int:
    """Bytes autograd keeps per row of ``forward(rows)`` (the network on its first ``rows`` rows):
    the saved tensors of two rows minus those of one, so weights and buffers saved once do not count.
    Measured once per ``model`` and ``key`` (input shape, dtype, device)."""
    known = _row_bytes.setdefault(model, {})
    if key not in known:
        sizes = []
        for rows in (1, 2):
            total = 0

            def pack(t: Tensor) -> Tensor:
                nonlocal total
                total += t.numel() * t.element_size()
                return t

            with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward(rows)  # with a graph even when called under no_grad or inference mode
            sizes.append(total)
        known[key] = max(sizes[1] - sizes[0], 1)
    return known[key]


def rows_within(nbytes: int, per_row: int) -> int:
    """How many rows of ``per_row`` bytes fit in ``nbytes`` (at least one)."""
    return max(1, nbytes // max(per_row, 1))


def gradient_rows(num_params: int, dtype: torch.dtype, device: torch.device | str | None = None) -> int:
    """How many dense ``P``-long gradient rows a pass may hold at once: a quarter of the budget,
    each row counted twice (the gradient and its copy while being reduced)."""
    return rows_within(budget(device) // 4, 2 * num_params * torch.empty((), dtype=dtype).element_size())


def pair_chunks(examples: int, draws: int, pairs: int, max_examples: int | None = None) -> Iterator[tuple[slice, slice]]:
    """``(examples, draws)`` slices covering every (example, draw) pair once, each at most
    ``pairs`` pairs and ``max_examples`` examples: whole examples (all their draws) while a
    single example's draws fit, else one example at a time in runs of draws."""
    per_chunk = max(1, min(max_examples or examples, pairs // draws)) if draws <= pairs else 1
    for s in range(0, examples, per_chunk):
        e = slice(s, min(s + per_chunk, examples))
        step = draws if draws <= pairs else pairs
        for d in range(0, draws, step):
            yield e, slice(d, min(d + step, draws))


__all__ = [
    "ACTIVATION_FACTOR",
    "DEFAULT_CPU_BUDGET",
    "activation_bytes",
    "budget",
    "budget_limit",
    "gradient_rows",
    "pair_chunks",
    "parse_bytes",
    "rows_within",
    "set_budget",
]
