"""Stored influence vs exact mode (issue 19): what a K-FAC / EK-FAC query costs, measured in one run.

Prints, on the same model, images (all 1797 digits by default), draws and batch size:

* ``influence featurisation / D-TRAK featurisation``: writing every training image's loss gradient
  in the K-FAC eigenbasis (``featurize_influence``, default ``dim``) against D-TRAK's structured
  featurisation at its defaults, at the same K (goal <= 1.5);
* ``exact / stored`` for one EK-FAC query batch: exact mode recomputes every training gradient
  per call; stored mode computes only the query gradients and one product with the stored rows
  (goal >= 20);
* the store's bytes per image for the stored rows and for the D-TRAK features.

The factors (one pass, with EK-FAC) are fit once beforehand and not part of either ratio.

    python benchmarks/bench_influence.py [--ckpt runs/digits/last.ckpt] [--timesteps 100] [--queries 32]
    python benchmarks/bench_influence.py --timesteps 10 --attribute-timesteps 100   # the attribute ratio at the default K

A stored call's time does not depend on the K its rows were made with (a row has the same size
whatever K), so ``--attribute-timesteps`` measures the attribute ratio at a larger K (exact mode's
training and query draws, stored mode's query draws) without featurising at it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from wherefrom.attribution.influence import influence_scores
from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.features import FeatureConfig, featurize
from wherefrom.kfac import FactorConfig, fit_factors
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.model import DiffusionModel
from wherefrom.store import Entry, Store


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a digits checkpoint (default: the default UNet, freshly initialised)")
    p.add_argument("--num-images", type=int, default=1797)
    p.add_argument("--timesteps", type=int, default=FeatureConfig.timesteps, help="K draws per training gradient (both featurisations, exact mode)")
    p.add_argument("--attribute-timesteps", type=int, default=None, help="K of the attribute comparison (default: --timesteps)")
    p.add_argument("--queries", type=int, default=32, help="queries per attribute call")
    p.add_argument("--dim", type=int, default=InfluenceConfig.dim)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    module = (load_module(a.ckpt) if a.ckpt else DiffusionModel()).eval()
    dm = DigitsDataModule(subset=list(range(a.num_images)))
    dm.setup()
    queries = DigitsDataModule().images[-a.queries :] * -1  # any images in [-1, 1]
    net, task, k = module.unet, module.task, a.timesteps
    ka = a.attribute_timesteps or k
    print(f"N={a.num_images} digits, default UNet ({sum(p.numel() for p in net.parameters()):,} parameters), K={k} (featurisations), K={ka} (attribute), "
          f"{a.queries} queries, batch {a.batch_size}, {torch.get_num_threads()} threads\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        store = Store(root, dm.fingerprint)
        fit_s, _ = timed(lambda: fit_factors(net, "model", task, dm, dm.indices, store, FactorConfig(passes=1, ekfac=True), a.batch_size))
        dtrak = FeatureConfig(timesteps=k)
        dtrak_s, _ = timed(lambda: featurize(net, "model", task, dm, store, dtrak, a.batch_size))
        config = InfluenceConfig(dim=a.dim, timesteps=k)
        stored_s, _ = timed(lambda: featurize_influence(net, "model", task, dm, dm.indices, store, config, a.batch_size))
        attribute = lambda grads: influence_scores(  # noqa: E731
            module, dm, queries, store, "loss", ekfac=True, grads=grads, config=config.features(ka), batch_size=a.batch_size,
            query_timesteps=ka if grads == "stored" else None,
        )
        query_s, stored_scores = timed(lambda: attribute("stored"))
        exact_s, exact_scores = timed(lambda: attribute("exact"))
        row_bytes = {
            name: int(np.prod(entry["shape"][1:])) * (2 if entry["dtype"] == "bfloat16" else np.dtype(entry["dtype"]).itemsize)
            for name, entry in ((n, store.manifest["entries"][n]) for n in (Entry.influence("model"), Entry.features("square_norm", "model")))
        }
    full = np.corrcoef(stored_scores.ravel(), exact_scores.ravel())[0, 1]
    print("| what | seconds | ratio | goal |")
    print("|---|---|---|---|")
    print(f"| factors, 1 pass + EK-FAC (not in the ratios) | {fit_s:.1f} | | |")
    print(f"| D-TRAK featurisation (structured D={dtrak.proj_dim}) | {dtrak_s:.1f} | 1.00 (reference) | |")
    print(f"| influence featurisation (D={a.dim}, {config.dtype}) | {stored_s:.1f} | {stored_s / dtrak_s:.2f} x D-TRAK's | <= 1.5 |")
    print(f"| EK-FAC attribute, exact mode (K={ka}) | {exact_s:.1f} | 1.00 (reference) | |")
    print(f"| EK-FAC attribute, stored mode (K={ka} query draws) | {query_s:.1f} | {exact_s / query_s:.1f} x faster | >= 20 |")
    print(f"\nstore per image: stored influence {row_bytes[Entry.influence('model')]:,} B, D-TRAK features {row_bytes[Entry.features('square_norm', 'model')]:,} B; "
          f"stored vs exact scores: Pearson r = {full:.3f} over all query x image pairs"
          + (f" (rows made with K={k}, exact mode's with K={ka})" if ka != k else ""))  # fmt: skip


if __name__ == "__main__":
    main()
