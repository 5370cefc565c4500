"""``wherefrom attribute``: one command for every attribution method.

A method is a function ``attribute(module, datamodule, queries, args) -> Attribution``
registered in :data:`METHODS`; this module resolves the checkpoint, the
training data and the queries, and writes the common outputs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from wherefrom.attribution.gradients import FeatureConfig
from wherefrom.attribution.report import Attribution, write_attribution
from wherefrom.datamodules.base import to_model_range
from wherefrom.errors import ArgumentParser, WherefromError
from wherefrom.io import check_out_dir, load_array

# method -> "module:function"
METHODS: dict[str, str] = {
    "random": "wherefrom.attribution.baseline:random_attribute",
    "ablation": "wherefrom.ensemble.synthetic:attribute",
    "ablation-loss": "wherefrom.ensemble.synthetic:loss_attribute",
    "trak": "wherefrom.attribution.trak:attribute",
    "dtrak": "wherefrom.attribution.trak:attribute",
    "kfac": "wherefrom.attribution.influence:attribute",
    "ekfac": "wherefrom.attribution.influence:attribute",
}
# methods that score from a store (features or factors), checked before any query is generated
NEEDS_STORE = {"trak": "featurize", "dtrak": "featurize", "kfac": "factors", "ekfac": "factors"}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="wherefrom attribute", description="Score every training image's influence on each query.")
    p.add_argument("--ckpt", required=True, help="checkpoint from `wherefrom fit` (single model or ensemble)")
    p.add_argument("--method", required=True, help="attribution method")
    p.add_argument("--out", required=True, help="folder for scores.npy, topk.json, topk.png")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--queries", default=None, help="samples.npy (N x C x H x W in [-1, 1]) or 'val'; default: generate --num-samples with --seed")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="denoising steps when generating queries")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--store", default=None, help="feature/factor store (TRAK, D-TRAK, K-FAC)")
    p.add_argument("--measurement", default="loss", help="K-FAC: loss, elbo, square_norm, loss_at_time; ablation-loss: loss or elbo")
    p.add_argument("--exact", action="store_true", help="ablation: also run exact ablation for the top-k")
    p.add_argument("--grads", choices=["exact", "projected"], default="exact", help="K-FAC: dense training gradients, or the store's TRAK (loss) features")
    p.add_argument("--damping", type=float, default=None, help="relative damping: TRAK/D-TRAK x the feature kernel's mean nonzero eigenvalue, K-FAC x each layer's mean eigenvalue (default: each method's)")
    p.add_argument("--normalize", action="store_true", help="TRAK/D-TRAK: unit-normalise training features first (ReTrac-style, opt-in)")
    p.add_argument("--timesteps", type=int, default=FeatureConfig.timesteps, help="K-FAC exact mode: seeded (t, eps) draws per gradient; ablation-loss: draws per query")
    p.add_argument("--batch-size", type=int, default=64)
    return p


def load_queries(spec: str | None, module, datamodule, args: argparse.Namespace) -> Tensor:
    """Query images from a file, the held-out split, or freshly generated (seeded)."""
    if spec is None:
        if args.num_samples < 1:
            raise WherefromError(f"--num-samples must be >= 1, got {args.num_samples}")
        return module.generate(args.num_samples, seed=args.seed, steps=args.steps, scheduler=args.scheduler, progress=True)
    if spec == "val":
        val = datamodule.val_images
        if len(val) == 0:
            raise WherefromError("the checkpoint's datamodule has no held-out split; train with --data.val_size > 0 or pass --queries samples.npy")
        return val
    if not Path(spec).is_file():
        raise WherefromError(f"queries file {spec!r} does not exist; pass samples.npy from `wherefrom sample` or 'val'")
    queries = to_model_range(load_array(spec, "queries"), f"queries {spec}")
    if tuple(queries.shape[1:]) != tuple(datamodule.image_shape):
        raise WherefromError(f"queries have shape {tuple(queries.shape[1:])} but the training images are {tuple(datamodule.image_shape)}")
    return queries


def method_function(method: str) -> Callable[..., Attribution]:
    """The registered ``attribute(module, datamodule, queries, args)`` of ``method``."""
    if method not in METHODS:
        raise WherefromError(f"unknown --method {method!r}; choose one of {sorted(METHODS)}")
    mod, _, fn = METHODS[method].partition(":")
    return getattr(importlib.import_module(mod), fn)


def attribute_main(argv: list[str]) -> None:
    from wherefrom.model import load_datamodule, load_module

    args = parser().parse_args(argv)
    check_out_dir(args.out)
    attribute = method_function(args.method)
    if args.method in NEEDS_STORE and args.store is None:
        raise WherefromError(f"--method {args.method} needs --store, the folder written by `wherefrom {NEEDS_STORE[args.method]}`")
    module = load_module(args.ckpt)
    datamodule = load_datamodule(args.ckpt)
    queries = load_queries(args.queries, module, datamodule, args)
    result = attribute(module, datamodule, queries, args)
    out = write_attribution(args.out, result, datamodule.images, args.top_k)
    print(f"wrote {out / 'scores.npy'}, {out / 'topk.json'}, {out / 'topk.png'}")
