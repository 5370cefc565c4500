"""Synthetic-ablation cost, as ratios measured in one run (issue 4).

1. ``J`` time / sampling time: computing ``J = d x0 / d a`` (Q x D x n, forward
   mode through the whole chain) for one batch of queries, divided by one
   ensemble sampling run of the same batch (the normal sampler: no AD, fused
   attention). Goal <= 3n. Printed for each Jacobian strategy (see
   :class:`wherefrom.ensemble.synthetic.JacobianStrategy`).
2. Attribution of all N training images: given ``J``, the Gram-matrix scores of
   every index vs exact ablation of every index (N sampling runs without the
   members in S(x); a few are timed and the rest extrapolated). The speed-up is
   printed with and without the time to compute ``J``.

Sampling runs and Jacobians alternate (sample, J, sample, J, ..., sample) so
that load from other processes hits both alike; the sampling time is the median
of its runs. Costs are per denoising step, so the ratios do not depend on
``--steps`` (default 10 to keep CPU runs short). Without ``--ckpt`` the members
are untrained UNets of the digits ensemble's architecture with its codes
(configs/digits_ensemble.yaml: n = 16, w = 4, N = 1797); timing does not depend
on the weights.

    OMP_NUM_THREADS=2 python benchmarks/bench_synthetic.py
    python benchmarks/bench_synthetic.py --ckpt runs/digits_ensemble/last.ckpt --steps 100 --strategies vmap
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EnsembleSampler
from wherefrom.ensemble.synthetic import JacobianStrategy, linearize, synthetic_scores
from wherefrom.model import build_unet
from wherefrom.task import DiffusionTask

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_ensemble.yaml"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def build(args: argparse.Namespace) -> EnsembleSampler:
    """The sampler of ``--ckpt``, or untrained members of the digits ensemble's architecture and codes."""
    chain = dict(seed=args.seed, steps=args.steps, scheduler=args.scheduler, device=args.device)
    if args.ckpt:
        module = load_module(args.ckpt).to(args.device).eval()
        return module.sampler(**chain)
    model = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    dm = DigitsDataModule()
    dm.setup()
    codes = Codes.generate(dm.indices, model["n"], model["w"], model["seed"], dm.fingerprint)
    members = [build_unet(None, seed=i).to(args.device).eval() for i in range(codes.n)]
    return EnsembleSampler(members, DiffusionTask(), dm.image_shape, codes, **chain)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="an ensemble checkpoint (default: untrained digits-ensemble members)")
    p.add_argument("--queries", type=int, default=8, help="queries in the batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--strategies", default="vmap,rows", help="comma-separated Jacobian strategies (vmap, rows, sequential)")
    p.add_argument("--exact-runs", type=int, default=3, help="exact ablations timed for the extrapolation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    strategies = [JacobianStrategy(s) for s in args.strategies.split(",")]

    sampler = build(args)
    codes, n, queries = sampler.codes, sampler.n, list(range(args.queries))

    def sample() -> float:
        with torch.no_grad():
            return timed(lambda: sampler.sample(queries))[0]

    warm = copy.copy(sampler)  # warm-up (allocations, kernels) on a 2-step chain
    warm.steps = 2
    with torch.no_grad():
        warm.sample(queries)
    linearize(warm, queries, strategy=strategies[0])
    sample_times, jac_times, lins = [sample()], {}, {}
    for strategy in strategies:
        jac_times[strategy], lins[strategy] = timed(lambda: linearize(sampler, queries, strategy=strategy))
        sample_times.append(sample())
    t_sample = statistics.median(sample_times)

    print(f"device {args.device}, n = {n} members, w = {codes.w}, N = {codes.num_images} training images, "
          f"{args.queries} queries, {args.steps} {args.scheduler} steps")
    print(f"one ensemble sampling run: {t_sample:.2f} s (median of {len(sample_times)}: {', '.join(f'{t:.2f}' for t in sample_times)})")
    for strategy, t in jac_times.items():
        print(f"J by {strategy.value:>10}: {t:.2f} s = {t / t_sample:.2f} x sampling = {t / t_sample / n:.2f} per tangent "
              f"(goal <= 3n = {3 * n}: {'met' if t / t_sample <= 3 * n else 'NOT met'})")

    lin = lins[strategies[0]]
    t_scores, scores = timed(lambda: synthetic_scores(lin, codes))
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(codes.indices, size=args.exact_runs, replace=False)
    with torch.no_grad():
        t_exact = statistics.mean(timed(lambda: sampler.ablate([int(x)], queries))[0] for x in picks)
    t_all_exact = t_exact * codes.num_images
    t_j = min(jac_times.values())
    print(f"scores of all N = {codes.num_images} images given J: {t_scores * 1e3:.1f} ms "
          f"({scores.shape[0]} x {scores.shape[1]})")
    print(f"exact ablation: {t_exact:.2f} s per image (mean of {args.exact_runs}), all N extrapolated: {t_all_exact:.0f} s")
    print(f"speed-up given J: {t_all_exact / t_scores:,.0f}x; including J ({t_j:.1f} s): {t_all_exact / (t_j + t_scores):,.1f}x")


if __name__ == "__main__":
    main()
