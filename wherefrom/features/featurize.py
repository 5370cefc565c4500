"""Featurisation of a training set into the store: ``features/<output>/<model_id>`` arrays, and the
chunked, resumable, rank-invariant row writer (:func:`write_rows`) every per-image array shares.

Row ``i`` of ``features/<output>/<model_id>`` (N x D, N the size of the global index
space) is the projected per-sample gradient of image ``i`` (see
:class:`~wherefrom.features.projection.Projection`); rows outside the
selected split are zero, i.e. without influence. The manifest holds the full
:class:`~wherefrom.features.config.FeatureConfig` plus the model id, the
actual dimension and a hash of the weights.

Work is split into *chunks*: ``batch_size`` consecutive indices of the sorted
split. A chunk's composition depends only on the split and ``batch_size``, so
its bytes are the same whichever rank computes it, and a rerun after a crash
recomputes exactly the chunks with a row not done: results are invariant to
DDP rank count and byte-identical after a resume. Under DDP, ranks take the
chunks round-robin (each index exactly once, no padded sampler), gather each
round, and only global rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from wherefrom.ddp import Comm, LocalComm, gather, on_rank_zero
from wherefrom.errors import WherefromError
from wherefrom.features.config import FeatureConfig
from wherefrom.features.projection import Projection
from wherefrom.io import weights_hash
from wherefrom.progress import progress_bar
from wherefrom.store import Entry, Store
from wherefrom.task import DiffusionTask, Stream, condition


def project_images(
    projection: Projection,
    task: DiffusionTask,
    images: Tensor,
    index: Tensor,
    config: FeatureConfig,
    stream: Stream = Stream.FEATURES,
    cond: Tensor | None = None,
) -> Tensor:
    """Features (``B x dim``) of a batch of images with global indices ``index`` and conditions ``cond``."""
    x0 = images.to(projection.device, projection.dtype)
    cond = None if cond is None else cond.to(projection.device)
    return projection.projected_grads(task, x0, index, config.output, config.draws(task), stream, cond)


def write_rows(
    store: Store | None,
    name: str,
    meta: dict[str, Any],
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    datamodule: Any,
    split: np.ndarray,
    rows: Callable[[dict[str, Tensor]], Tensor],
    batch_size: int,
    comm: Comm | None = None,
    progress: bool = False,
) -> None:
    """Write (or resume) the row-per-index array ``name`` (``N x dim``): ``rows(batch)`` for every
    index of ``split``, zeros elsewhere (no influence). Chunks of ``batch_size`` consecutive
    split indices go round-robin to the ranks (see the module docstring); every rank calls
    this with the same arguments, ``store`` is used on global rank 0 only."""
    comm = comm or LocalComm()
    if batch_size < 1:
        raise WherefromError(f"batch_size must be >= 1, got {batch_size}")
    split = np.sort(np.asarray(split, dtype=np.int64))
    chunks = [split[s : s + batch_size] for s in range(0, len(split), batch_size)]
    array = None

    def open_array() -> list[int]:
        nonlocal array
        array = store.array(name, (datamodule.num_images, dim), meta, str(dtype).removeprefix("torch."))
        outside = np.setdiff1d(np.flatnonzero(array.done == 0), split)
        if outside.size:  # rows of images outside the split: zero features, no influence
            array.write(outside, np.zeros((outside.size, dim)))
        done = array.done
        return [c for c, part in enumerate(chunks) if not done[part].all()]

    todo = on_rank_zero(comm, open_array)
    mine = np.concatenate([chunks[c] for c in todo[comm.global_rank :: comm.world_size]] or [np.zeros(0, np.int64)])
    # the rank's chunks in order: every chunk but the split's last is full, so batches == chunks
    loader = iter(DataLoader(datamodule.dataset(mine), batch_size=batch_size, shuffle=False))
    with progress_bar(total=sum(len(chunks[c]) for c in todo), desc=name, disable=not progress or comm.global_rank) as bar:
        for _ in range(-(-len(todo) // comm.world_size)):
            index = torch.full((batch_size,), -1, dtype=torch.long, device=device)
            values = torch.zeros(batch_size, dim, dtype=dtype, device=device)
            batch = next(loader, None)
            if batch is not None:
                n = len(batch["index"])
                index[:n] = batch["index"].to(device)
                values[:n] = rows(batch)
            index, values = gather(comm, index).flatten(0, 1), gather(comm, values).flatten(0, 1)
            if comm.global_rank == 0:
                keep = index >= 0
                array.write(index[keep].cpu().numpy(), values[keep])
                bar.update(int(keep.sum()))


def featurize(
    model: nn.Module,
    model_id: str,
    task: DiffusionTask,
    datamodule: Any,
    store: Store | None,
    config: FeatureConfig,
    batch_size: int = 64,
    comm: Comm | None = None,
    progress: bool = False,
) -> None:
    """Write (or resume) ``features/<output>/<model_id>`` for every index of ``datamodule``'s split.

    ``datamodule`` needs ``indices`` (the split's global indices), ``num_images``
    (N) and ``dataset(indices)`` yielding ``{"index", "image"}``. Every rank calls
    this with the same arguments; ``store`` is used on global rank 0 only.
    """
    projection = Projection(config, model, model_id)
    meta = {**config.to_dict(), "model_id": model_id, "dim": projection.dim, "weights": weights_hash(model)}
    if "objective" in task.config:  # another objective than epsilon on a named schedule (which older stores imply)
        meta["objective"] = task.config["objective"]

    def rows(batch: dict[str, Tensor]) -> Tensor:
        return project_images(projection, task, batch["image"], batch["index"], config, cond=condition(batch))

    was_training = model.training
    model.eval()
    try:
        # a bfloat16 model's features are kept in float32: TRAK's kernel needs their precision
        dtype = torch.float32 if projection.dtype == torch.bfloat16 else projection.dtype
        write_rows(store, Entry.features(config.output, model_id), meta, projection.dim, dtype, projection.device,
                   datamodule, datamodule.indices, rows, batch_size, comm, progress)  # fmt: skip
    finally:
        model.train(was_training)


__all__ = ["featurize", "project_images", "write_rows"]
