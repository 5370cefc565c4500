"""Synthetic vs exact ablation on a small encoded ensemble where every code is ablated exactly (issue 4).

Trains an ensemble (default n = 6, w = 3) on the first C(n, w) = 20 digits, so
the training images carry *all* distinct weight-w codes, or loads ``--ckpt``.
For each of ``--queries`` generated samples it compares, over every training
image (= every code), the synthetic-ablation distance ``||J (a'(x) - a)||``
(Dai, Yew & Gifford, "Where did you learn that?", synthetic ablation) with the
exact leave-one-out distance ``||x0(a'(x)) - x0(a)||`` from rerunning the
chain with the same noise, and prints their Spearman correlation per query and
averaged (goal >= 0.9).

The linearisation is most faithful for DDPM (the default): its injected noise
makes the chain contract, while DDIM's deterministic chain amplifies the change
of weights, and the clamping of x0 predictions (``--no-clip-sample`` turns it
off) adds kinks that a Jacobian cannot see.

    OMP_NUM_THREADS=2 python benchmarks/validate_synthetic.py --save /tmp/val_ens.ckpt
    python benchmarks/validate_synthetic.py --ckpt /tmp/val_ens.ckpt --scheduler ddim --no-clip-sample
"""

from __future__ import annotations

import argparse
import math
import time

import lightning as L
import numpy as np
import torch

from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.ensemble.synthetic import linearize, synthetic_scores
from wherefrom.evaluation.stats import Correlation, spearman_rows


def train(args: argparse.Namespace) -> EncodedEnsemble:
    """The small ensemble on the first C(n, w) digits (every code used once)."""
    images = math.comb(args.n, args.w)
    model = EncodedEnsemble(n=args.n, w=args.w, lr=args.lr, warmup=0.05, seed=args.seed)
    dm = DigitsDataModule(batch_size=args.batch_size, subset=list(range(images)))
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    print(f"trained n={args.n}, w={args.w} on {images} digits for {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
    if args.save:
        trainer.save_checkpoint(args.save)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="an ensemble checkpoint (default: train one here)")
    p.add_argument("--save", default=None, help="save the trained ensemble here")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--w", type=int, default=3)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--root", default="/tmp/validate_synthetic")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=True, help="clamp x0 predictions to [-1, 1]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    module = (load_module(args.ckpt) if args.ckpt else train(args)).eval()
    codes = module.codes
    sampler = module.sampler(seed=args.seed, steps=args.steps, scheduler=args.scheduler, clip_sample=args.clip_sample)
    start = time.perf_counter()
    lin = linearize(sampler, args.queries)
    synthetic = synthetic_scores(lin, codes)[:, codes.indices]
    t_synthetic = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():  # exact ablation of every code, with the same noise
        full = sampler.sample(args.queries)
        exact = np.stack([(sampler.ablate([int(x)], args.queries) - full).flatten(1).norm(dim=1).cpu().numpy() for x in codes.indices], 1)
    t_exact = time.perf_counter() - start
    corr = Correlation.of(spearman_rows(synthetic, exact))

    distinct = len({row.tobytes() for row in codes.bits})
    print(f"{args.scheduler} (clip_sample={args.clip_sample}), {args.steps} steps, {args.queries} queries; {distinct} distinct codes "
          f"(all C({codes.n}, {codes.w}) = {math.comb(codes.n, codes.w)}), each ablated exactly")
    print(f"time: synthetic (J + all scores) {t_synthetic:.1f} s, exact ablation of every code {t_exact:.1f} s")
    for q, rho in enumerate(corr.per_query):
        print(f"  query {q}: Spearman(synthetic, exact) = {rho:+.3f}")
    print(f"mean Spearman over queries = {corr.mean:+.3f} (95% bootstrap CI {corr.ci_low:+.3f} .. {corr.ci_high:+.3f}); goal >= 0.9")
    err = np.abs(synthetic - exact) / np.median(exact)
    print(f"|synthetic - exact| distance / median exact distance: median {np.median(err):.3f}, max {err.max():.3f}")


if __name__ == "__main__":
    main()
