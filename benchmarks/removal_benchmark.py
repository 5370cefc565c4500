"""The encoded ensemble's own ground truth (issue 21): for the ensemble's samples, remove each method's
top-k training images exactly (their members dropped, the chain rerun with the same noise) against k
random images, and measure the rise of the sample's loss and how far the sample moves, with 95%
intervals over samples; and the rank agreement of synthetic ablation with exact ablation.

    python benchmarks/removal_benchmark.py --ckpt runs/digits_ensemble/last.ckpt --out runs/removal
    python benchmarks/removal_benchmark.py --ckpt ENS.ckpt --store STORE --out DIR    # TRAK/D-TRAK/K-FAC too

Methods: synthetic ablation (``ablation``) and the signed loss scores (``ablation-loss``), each raw and
controlled by unused codes (when the codes leave them), pixel similarity, random, and with ``--store``
(written for this checkpoint by ``wherefrom featurize`` / ``wherefrom factors``) TRAK, D-TRAK, K-FAC
and EK-FAC on the members. Each method's scores are cached under ``out/scores`` and its removals in
``out/results.json``: a rerun resumes, and one with a ``--store`` added removes only the new methods.
The table goes to ``out/removal.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wherefrom.attribution.api import attributor
from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.ensemble.controls import control_codes
from wherefrom.ensemble.synthetic import linearize, measurement_scores, quadratic_measurement, synthetic_scores
from wherefrom.errors import WherefromError, one_line
from wherefrom.evaluation.removal import Removal, RemovalBenchmark, removal_benchmark
from wherefrom.evaluation.stats import BootstrapConfig
from wherefrom.io import atomic_path, check_out_dir, write_bytes, write_json, write_npy
from wherefrom.target import as_data


def ensemble_scores(a: argparse.Namespace, sampler, samples: torch.Tensor, num_images: int) -> dict[str, np.ndarray]:
    """Synthetic ablation and the signed loss scores, raw and controlled, from one Jacobian and one
    quadratic form (what ``SyntheticAblation`` / ``AblationLoss`` with ``control=False/True`` compute)."""
    codes = sampler.codes
    try:
        controls = control_codes(codes, True)
    except WherefromError as e:
        print(f"no controlled scores: {one_line(e, 300)}", flush=True)
        controls = None
    lin = linearize(sampler, len(samples), batch_size=a.batch_size, progress=True)
    quad = quadratic_measurement(sampler, samples, "loss", a.draws, seed=a.seed)
    out = {"ablation, raw": synthetic_scores(lin, codes, num_images), "ablation-loss, raw": measurement_scores(quad, sampler.uniform_weights(), codes, num_images)}
    if controls is not None:
        out["ablation, controlled"] = synthetic_scores(lin, codes, num_images, controls)
        out["ablation-loss, controlled"] = measurement_scores(quad, sampler.uniform_weights(), codes, num_images, controls)
    return out


def other_methods(a: argparse.Namespace) -> dict:
    """The methods that do not need the ensemble's codes, by their table name."""
    out = {"pixel": attributor("pixel"), "random": attributor("random", seed=a.seed)}
    if a.store:
        out |= {m: attributor(m, store=a.store) for m in ("trak", "dtrak", "kfac", "ekfac")}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an encoded-ensemble checkpoint (EncodedEnsemble, jointly trained or assembled)")
    p.add_argument("--out", required=True, help="output folder (a rerun resumes from its cached scores)")
    p.add_argument("--store", default=None, help="store with the checkpoint's TRAK/D-TRAK features and K-FAC factors")
    p.add_argument("--num-samples", type=int, default=64, help="the ensemble's samples to attribute")
    p.add_argument("--k", type=int, default=1, help="images removed per sample (with w near n / 2, a few random images already drop every member)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the methods' draws; the ground truth uses seed + 1)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--draws", type=int, default=128, help="(t, eps) draws of the loss")
    p.add_argument("--agreement-top", type=int, default=50, help="synthetic vs exact ablation: each sample's top images compared")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    try:
        if min(a.num_samples, a.k, a.steps, a.draws, a.agreement_top, a.batch_size) < 1:
            raise WherefromError("--num-samples, --k, --steps, --draws, --agreement-top and --batch-size must be >= 1")
        out = check_out_dir(a.out, "--out")
        if not Path(a.ckpt).is_file():
            raise WherefromError(f"--ckpt {a.ckpt!r} is not a file")
        module = load_module(a.ckpt)
        if getattr(module, "codes", None) is None:
            raise WherefromError(f"--ckpt {a.ckpt!r} is not an encoded ensemble with codes; train one with configs/digits_ensemble.yaml")
        data = as_data(load_datamodule(a.ckpt), "the removal benchmark")
        if not a.k <= a.agreement_top <= len(data.indices):
            raise WherefromError(f"need --k <= --agreement-top <= {len(data.indices)} (the training images), got {a.k} and {a.agreement_top}")
        settings = {k: v for k, v in vars(a).items() if k not in ("out", "agreement_top", "batch_size")}
        if (out / "args.json").is_file():  # a rerun may add a --store (its methods are added), never change one
            before = json.loads((out / "args.json").read_text())
            store = before.pop("store", None)
            if before != {k: v for k, v in settings.items() if k != "store"} or None not in (store, a.store) and store != a.store:
                raise WherefromError(f"--out {a.out!r} holds a run with other settings ({out / 'args.json'}); pass another --out")
            settings["store"] = a.store = a.store or store
        write_json(out / "args.json", settings)
        run(a, module, data, out)
    except WherefromError as e:
        print(f"removal_benchmark: error: {one_line(e, 400)}", file=sys.stderr)
        sys.exit(2)


def cached(path: Path, compute) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (an ``.npz``), computed and written atomically when absent."""
    if not path.is_file():
        arrays = compute()
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def run(a: argparse.Namespace, module, data, out: Path) -> None:
    start = time.perf_counter()
    sampler = module.eval().sampler(seed=a.seed, steps=a.steps, scheduler=a.scheduler)
    with torch.no_grad():
        samples = sampler.sample(list(range(a.num_samples)))
    write_npy(out / "samples.npy", samples.numpy().astype(np.float32))
    scores, skipped = cached(out / "scores" / "ensemble.npz", lambda: ensemble_scores(a, sampler, samples, data.num_images)), {}
    print(f"[{time.perf_counter() - start:.0f} s] ablation and ablation-loss", flush=True)
    for name, method in other_methods(a).items():
        try:
            scores[name] = cached(out / "scores" / f"{name}.npz", lambda m=method: {"scores": m.attribute(module, data, samples).scores.astype(np.float64)})["scores"]
        except WherefromError as e:  # e.g. no such entry in the store: reported, not fatal
            skipped[name] = one_line(e, 300)
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        print(f"[{time.perf_counter() - start:.0f} s] {name}", flush=True)
    # a rerun (e.g. with a --store added) removes only the methods results.json does not hold yet
    done = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {"removals": {}, "agreement": {}}
    kept = {m: Removal(np.asarray(r["sets"]), np.asarray(r["loss"], dtype=float), np.asarray(r["distance"], dtype=float)) for m, r in done["removals"].items() if m in scores}
    synthetic = [m for m in scores if m == "ablation, raw" and m not in done["agreement"]]
    new = removal_benchmark(sampler, samples, {m: s for m, s in scores.items() if m not in kept}, a.k, a.draws, a.seed + 1, synthetic, a.agreement_top, a.batch_size, progress=True)
    removals = kept | new.removals
    agreement = {m: np.asarray(v) for m, v in done["agreement"].items()} | new.agreement
    result = RemovalBenchmark(a.k, {m: removals[m] for m in scores}, agreement)
    boot = BootstrapConfig()
    text = result.table(boot) + "".join(f"\n\nSkipped {m}: {why}" for m, why in skipped.items())
    write_bytes(out / "removal.md", text + "\n")
    write_json(out / "results.json", {
        "k": a.k, "num_samples": a.num_samples, "draws": a.draws, "agreement_top": a.agreement_top, "skipped": skipped,
        "removals": {m: {"sets": r.sets.tolist(), "loss": r.loss.tolist(), "distance": r.distance.tolist()} for m, r in result.removals.items()},
        "agreement": {m: v.tolist() for m, v in result.agreement.items()},
    })  # fmt: skip
    print(text)
    print(f"[removal] {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
