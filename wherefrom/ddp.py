"""What a computation spread over DDP ranks needs: the collectives (:class:`Comm`, which a
Lightning ``Strategy`` provides; :class:`LocalComm` for one process), a gather that always stacks
ranks, and rank-zero work whose result or error every rank receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from torch import Tensor

from wherefrom.errors import WherefromError

T = TypeVar("T")


class Comm(Protocol):
    """The collectives featurisation needs; a Lightning ``Strategy`` provides them."""

    world_size: int
    global_rank: int

    def all_gather(self, tensor: Tensor) -> Tensor: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class LocalComm:
    """A single process."""

    world_size = 1
    global_rank = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def gather(comm: Comm, tensor: Tensor) -> Tensor:
    """``world x ...`` (Lightning's single-device strategy returns the tensor unstacked)."""
    out = comm.all_gather(tensor)
    return out if out.dim() > tensor.dim() else out.unsqueeze(0)


def on_rank_zero(comm: Comm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 only; broadcast its result, or its error, to every rank."""
    result: Any = None
    error: WherefromError | None = None
    if comm.global_rank == 0:
        try:
            result = fn()
        except WherefromError as e:
            error = e
    result, error = comm.broadcast((result, error), src=0)
    if error is not None:
        raise error
    return result


__all__ = ["Comm", "LocalComm", "gather", "on_rank_zero"]
