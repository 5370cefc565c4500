"""The curvature pass: output vectors ``r`` with ``E[r r^T] = S S^T`` (type-2, MC, empirical; see
:mod:`wherefrom.kfac`) backpropagated through the network over seeded draws."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from wherefrom.kfac.collector import FactorCollector
from wherefrom.kfac.factors import MC_TAG, Curvature
from wherefrom.task import DiffusionTask, Stream, chunk_rows, condition, generator_for, predict


def output_vectors(
    output: Tensor, target: Tensor, curvature: Curvature | str, noise: Tensor | None = None, weight: Tensor | None = None
) -> Iterator[Tensor]:
    """The vectors ``r`` to backpropagate from the output for ``l = w ||f - y||^2 / D``, ``w`` the
    objective's per-row ``weight`` (``None``: 1; see the module docstring): one for ``mc``/``empirical``,
    ``D`` for ``type-2``. The loss is the negative log-likelihood of ``y ~ N(f, D / (2 w) I)``, so
    ``mc`` samples the objective's own output distribution: ``r = sqrt(2 w / D) z``."""
    curvature = Curvature(curvature)
    d = output[0].numel()
    root = None if weight is None else weight.to(device=output.device, dtype=output.dtype).sqrt().view(-1, *[1] * (output.dim() - 1))
    scale = (lambda r: r) if root is None else (lambda r: root * r)  # noqa: E731
    if curvature is Curvature.MC:
        if noise is None:
            raise ValueError("mc curvature needs the pseudo-target noise")
        yield scale(math.sqrt(2 / d) * noise)
    elif curvature is Curvature.EMPIRICAL:
        yield scale(scale((2 / math.sqrt(d)) * (output.detach() - target)))
    else:
        for c in range(d):
            column = output.new_zeros(output.shape[0], d)
            column[:, c] = math.sqrt(2 / d)
            yield scale(column.view_as(output))


def backpropagate(output: Tensor, target: Tensor, curvature: Curvature | str, noise: Tensor | None = None, weight: Tensor | None = None) -> None:
    """Backpropagate every curvature vector through the graph of ``output`` (the hooks record ``G``)."""
    vectors = output_vectors(output, target, curvature, noise, weight)
    v = next(vectors)
    for following in vectors:  # keep the graph for all but the last vector
        torch.autograd.backward(output, v, retain_graph=True)
        v = following
    torch.autograd.backward(output, v)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without ``requires_grad`` and the model in eval mode: a factor pass needs
    only output gradients, so autograd skips every weight-gradient kernel."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def mc_noise(task: DiffusionTask, index: Tensor, draw: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Seeded pseudo-target noise ``z`` per example, a pure function of (seed, index, draw)."""
    z = [torch.randn(shape, generator=generator_for(task.seed, int(Stream.FACTORS), i, draw, MC_TAG)) for i in index.tolist()]
    return torch.stack(z).to(device=like.device, dtype=like.dtype)


def factor_pass(
    denoiser: nn.Module,
    task: DiffusionTask,
    batches: Iterable[dict[str, Tensor]],
    collector: FactorCollector,
    curvature: Curvature | str,
    draw: int,
) -> None:
    """One pass over ``batches``: fresh seeded ``(t, eps)`` (stream FACTORS, draw id
    ``draw``), forward, and the curvature backward; ``collector`` records the statistics."""
    device = collector.model_device()
    dtype = next(iter(collector.layers.values())).weight.dtype
    rows = None
    with frozen(denoiser):
        for batch in batches:
            x0 = batch["image"].to(device=device, dtype=dtype)
            index = batch["index"]
            x_t, t, target = task.noisy(x0, index, "loss", draw, None, Stream.FACTORS)
            cond = condition(batch)
            cond = None if cond is None else cond.to(device)
            time, weight = task.model_time(t), task.weight("loss", t)
            if rows is None:  # before recording: the batch in chunks of the memory budget, the hooks' own rows counted
                hooks = collector.row_bytes(lambda: predict(denoiser, x_t[:1], time[:1], None if cond is None else cond[:1]))
                rows = chunk_rows(denoiser, x_t, time, cond, extra=hooks)
            with collector.recording():
                for s in range(0, len(x0), rows):  # the statistics are sums over rows
                    part = slice(s, s + rows)
                    out = predict(denoiser, x_t[part], time[part], None if cond is None else cond[part])
                    noise = mc_noise(task, index[part], draw, tuple(out.shape[1:]), out) if Curvature(curvature) is Curvature.MC else None
                    backpropagate(out, target[part], curvature, noise, None if weight is None else weight[part])
