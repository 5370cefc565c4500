"""Dense per-sample gradients of an output function (the D-TRAK recipe).

D-TRAK (Zheng et al., ICLR 2024, Sec. 3-4) featurises a training example ``x``
by the gradient of an output function ``f`` of the denoiser, averaged over K
seeded ``(t, eps)`` draws::

    g(x) = grad_theta (1/K) sum_k f(eps_theta(x_{t_k}, t_k), eps_k, t_k)

with ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4)
and ``f`` a measurement of :data:`wherefrom.task.MEASUREMENTS` (``loss`` gives
TRAK's training-loss gradient, ``square_norm`` D-TRAK's best output function).

Flattening order (the layout of every dense gradient, shared with
:class:`~wherefrom.features.projection.Projection` and the K-FAC scorer):
the trainable parameters (``requires_grad``) in ``model.named_parameters()``
order, each flattened row-major; see :func:`trainable_parameters`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from wherefrom.memory import gradient_rows, pair_chunks
from wherefrom.task import DiffusionTask, Stream, chunk_rows, condition_kwargs, network_output

Draws = Sequence[tuple[int, int | None]]  # [(draw id, fixed t or None = drawn per example)]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters gradients are taken with respect to, in flattening order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def num_parameters(model: nn.Module) -> int:
    """``P``: the length of a dense gradient (:func:`trainable_parameters`)."""
    return sum(p.numel() for p in trainable_parameters(model).values())


def noisy_inputs(
    task: DiffusionTask, x0: Tensor, index: Tensor, output: str, draws: Draws, stream: Stream = Stream.FEATURES
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``(x_t, t, target)`` of every (example, draw), shaped ``B x K x ...`` (see :meth:`DiffusionTask.noisy`)."""
    per_draw = [task.noisy(x0, index, output, d, t, stream) for d, t in draws]
    x_t, t, target = (torch.stack(z, 1) for z in zip(*per_draw))
    return x_t, t, target


def pair_rows(model: nn.Module, task: DiffusionTask, x0: Tensor, index: Tensor, output: str, draws: Draws, stream: Stream, cond: Tensor | None) -> int:
    """How many (example, draw) rows of this batch a pass may form at once (:func:`wherefrom.task.chunk_rows`
    of its first example's first draw). Call it before attaching hooks that record forwards."""
    x_t, t, _ = noisy_inputs(task, x0[:1], index[:1], output, list(draws)[:1], stream)
    return chunk_rows(model, x_t[:, 0], task.model_time(t[:, 0]), None if cond is None else cond[:1])


def per_sample_grads(
    model: nn.Module,
    task: DiffusionTask,
    x0: Tensor,
    index: Tensor,
    output: str,
    draws: Draws,
    stream: Stream = Stream.FEATURES,
    cond: Tensor | None = None,
) -> Tensor:
    """``B x P`` per-sample gradients of ``output`` averaged over ``draws``, under each example's
    condition ``cond`` (``None``: unconditional).

    ``vmap(grad)`` over the examples of a chunk, each evaluating its draws of the chunk as one inner
    batch; chunks of (example, draw) pairs fit the memory budget (:mod:`wherefrom.memory`) and their
    sums are accumulated, so memory is flat in B and K. The fused SDPA kernels have no vmap rule,
    hence the MATH backend.
    """
    draws = list(draws)
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in params}
    fn = task.measurement(output)
    pairs = pair_rows(model, task, x0, index, output, draws, stream, cond)
    num_params = num_parameters(model)
    first = next(iter(params.values()))
    out = torch.zeros(len(x0), num_params, dtype=first.dtype, device=first.device)  # the gradients' dtype, as vmap gives them

    def summed_output(p: dict[str, Tensor], x_t: Tensor, t: Tensor, time: Tensor, target: Tensor, c: Tensor | None) -> Tensor:
        c = None if c is None else c.unsqueeze(0).expand(len(x_t), *c.shape)  # the example's condition for each of its draws
        pred = network_output(functional_call(model, {**p, **frozen}, (x_t, time), condition_kwargs(model, c)))
        return fn(pred, target, t, task).sum()

    max_examples = gradient_rows(num_params, first.dtype, first.device)
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        for e, d in pair_chunks(len(x0), len(draws), pairs, max_examples):
            x_t, t, target = noisy_inputs(task, x0[e], index[e], output, draws[d], stream)
            time = task.model_time(t.flatten()).view_as(t)  # the network's time input, looked up outside vmap
            c = None if cond is None else cond[e]
            grads = vmap(grad(summed_output), in_dims=(None, 0, 0, 0, 0, None if c is None else 0))(params, x_t, t, time, target, c)
            out[e] += torch.cat([grads[n].reshape(len(x_t), -1) for n in params], 1)
    return out / len(draws)  # the mean over the draws


__all__ = ["Draws", "noisy_inputs", "num_parameters", "pair_rows", "per_sample_grads", "trainable_parameters"]
