"""K-FAC factor passes and influence scoring (issue 6), measured in one run.

Prints, on the same model, images and batch size:

* ``one factor pass / one training epoch`` (a real Lightning epoch) for curvature
  ``mc`` with K-FAC ``expand`` (goal <= 2) and ``reduce`` (goal <= 1.5), and for
  reference the naive ``expand`` that forms every conv's im2col patches and their
  Gram matrix (the Toeplitz path patched out);
* scoring throughput: ``score_features`` (Q preconditioned, projected queries against
  N stored features read from a ``.npy`` memmap in row blocks) vs one plain
  ``Q x D @ D x N`` matrix product of the same shape on the same features in host
  memory (goal >= 50%).

    OMP_NUM_THREADS=1 python benchmarks/bench_kfac.py --ckpt runs/digits/last.ckpt
    python benchmarks/bench_kfac.py --device cuda --ckpt runs/digits/last.ckpt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from bench_features import epoch_time, now
from torch.utils.data import DataLoader

from wherefrom.attribution import kfac
from wherefrom.attribution.influence import score_features
from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.kfac import FactorCollector, eigendecompose, factor_pass
from wherefrom.model import DiffusionModel


def pass_time(module: DiffusionModel, loader: DataLoader, approx: str, curvature: str, draw: int) -> float:
    """One timed factor pass (after a warm-up on two batches)."""
    collector = FactorCollector(module.unet, approx)
    with collector.attached():
        factor_pass(module.unet, module.task, [b for _, b in zip(range(2), loader)], collector, curvature, draw=draw)
        start = now()
        factor_pass(module.unet, module.task, loader, collector, curvature, draw=draw)
        return now() - start


def scoring_ratio(num: int, dim: int, queries: int, device: str, repeats: int = 3) -> float:
    """Throughput of ``score_features`` (features in a ``.npy`` memmap, as in the store) relative to
    one plain matmul of the same shape on the same features held in host memory (moved to the
    device inside the timing, as any scorer of stored features must)."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(num, dim, generator=gen)
    q = torch.randn(queries, dim, generator=gen).to(device)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "features.npy"
        np.save(path, features.numpy())
        stored = np.load(path, mmap_mode="r+")  # as the store opens its arrays
        score_features(q, stored)  # warm the page cache and the kernels
        times_score, times_mm = [], []
        for _ in range(repeats):
            start = now()
            score_features(q, stored)
            times_score.append(now() - start)
            start = now()
            (q @ features.to(device).T).cpu()
            times_mm.append(now() - start)
    t_score, t_mm = min(times_score), min(times_mm)
    print(f"  score_features {t_score:7.3f} s, plain matmul {t_mm:7.3f} s  (Q={queries}, D={dim}, N={num})")
    return t_mm / t_score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a digits checkpoint (default: the default UNet, freshly initialised)")
    p.add_argument("--num-images", type=int, default=1797, help="the first NUM_IMAGES digits (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="training and factor batch, as in configs/digits.yaml")
    p.add_argument("--curvature", default="mc")
    p.add_argument("--epochs", type=int, default=1, help="timed training epochs per round (after a warm-up one)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (training epoch, one pass of each variant)")
    p.add_argument("--score-n", type=int, default=32768, help="stored training features N for the scoring benchmark")
    p.add_argument("--score-dim", type=int, default=2048)
    p.add_argument("--score-queries", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    module = (load_module(a.ckpt) if a.ckpt else DiffusionModel()).eval().to(a.device)
    dm = DigitsDataModule(batch_size=a.batch_size, subset=list(range(a.num_images)))
    loader = DataLoader(dm.dataset(), batch_size=a.batch_size, shuffle=False)
    print(f"{a.num_images} digits, batch {a.batch_size}, {sum(p.numel() for p in module.unet.parameters())} parameters, "
          f"{len(kfac.tracked_layers(module.unet))} K-FAC layers, curvature {a.curvature}, on {a.device} ({torch.get_num_threads()} threads)")
    # rounds of (epoch, passes), back to back: on a shared machine the load drifts over minutes,
    # so each round gives its own ratios and the median over rounds is reported
    naive = mock.patch.object(kfac, "_toeplitz_gram", lambda conv, x, positions: False)
    ratios: dict[str, list[float]] = {"expand": [], "reduce": [], "naive expand": []}
    for r in range(a.rounds):
        t_epoch = epoch_time(module, dm, a.epochs)
        times = {"expand": pass_time(module, loader, "expand", a.curvature, r), "reduce": pass_time(module, loader, "reduce", a.curvature, r)}
        with naive:  # the im2col patches of every conv and their Gram matrix U U^T
            times["naive expand"] = pass_time(module, loader, "expand", a.curvature, r)
        print(f"  round {r + 1}: epoch {t_epoch:6.2f} s, " + ", ".join(f"{k} pass {t:6.2f} s" for k, t in times.items()))
        for k, t in times.items():
            ratios[k].append(t / t_epoch)
    collector = FactorCollector(module.unet, "expand")
    with collector.attached():
        factor_pass(module.unet, module.task, [b for _, b in zip(range(2), loader)], collector, a.curvature, draw=0)
    start = now()
    eigendecompose(collector.state_dict(), collector.layers)
    print(f"  eigendecomposition (float64, all layers) {now() - start:.2f} s")
    ratio = scoring_ratio(a.score_n, a.score_dim, a.score_queries, a.device)
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"factor pass / training epoch (median of {a.rounds} rounds): expand {med['expand']:.2f} (goal <= 2), "
          f"reduce {med['reduce']:.2f} (goal <= 1.5), naive expand {med['naive expand']:.2f}")
    print(f"scoring throughput / plain matmul: {ratio:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
