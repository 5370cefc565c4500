"""Encoded ensembles at database scale (issue 21; the encoded-ensembles paper's Sec. 3.1 and Fig. 2):
synthetic ablation of every training image for the ensemble's samples, what it costs, how well it
agrees with exact ablation, and what the ensemble's samples look like beside a single model's.

    wherefrom fit --config configs/digits_ensemble.yaml --trainer.default_root_dir runs/ens1797 \\
        --trainer.callbacks.init_args.dirpath runs/ens1797                    # n = 16, w = 5: 2,571 unused codes
    wherefrom fit --config configs/digits.yaml --trainer.max_epochs 200 --trainer.default_root_dir runs/single1797 \\
        --trainer.callbacks.init_args.dirpath runs/single1797                 # equal compute: w x 40 epochs
    python benchmarks/database_scale.py --ckpt runs/ens1797/last.ckpt --single runs/single1797/last.ckpt --out runs/scale

Prints and writes ``out/database_scale.md``:

* the Jacobian's cost in sampling runs (one chain of all samples with the ensemble: n member
  evaluations per step), against the goal of at most 1.5 n;
* the time to score all N images from the Jacobian, raw and controlled by the unused codes, and how
  much of the raw scores' spread over the images the additive member effect (the controls) explains;
* the rank agreement of synthetic with exact ablation over each sample's top images;
* ``out/fig2.png``: each sample above its most influential training image (controlled scores) and
  the exact counterfactual without that image (its members dropped, the same noise);
* the share of samples the digit classifier recognises, ensemble vs single model, with Wilson intervals.

The Jacobian and the sampling time it is compared with are cached in ``out/linearization.npz``: a
rerun with the same settings resumes after them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.ensemble.controls import control_codes
from wherefrom.ensemble.synthetic import Linearization, exact_ablation, linearize, synthetic_scores
from wherefrom.errors import WherefromError, one_line
from wherefrom.evaluation.quality import recognised
from wherefrom.evaluation.removal import Estimate, synthetic_agreement, top_in_split
from wherefrom.io import atomic_path, check_out_dir, save_grid, write_bytes, write_json


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an encoded-ensemble checkpoint with unused codes (e.g. n = 16, w = 5 on 1797 digits)")
    p.add_argument("--single", default=None, help="a single model trained with the ensemble's compute, for the sample-quality comparison")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--agreement-top", type=int, default=10, help="synthetic vs exact ablation over each sample's top images")
    p.add_argument("--quality-samples", type=int, default=512, help="samples of each model the digit classifier judges")
    p.add_argument("--batch-size", type=int, default=32, help="samples per Jacobian block (on 2 cores 32 was fastest: 16 and 64 took about 20%% longer)")
    a = p.parse_args(argv)
    try:
        if min(a.num_samples, a.steps, a.agreement_top, a.quality_samples, a.batch_size) < 1:
            raise WherefromError("--num-samples, --steps, --agreement-top, --quality-samples and --batch-size must be >= 1")
        out = check_out_dir(a.out, "--out")
        for path in filter(None, (a.ckpt, a.single)):
            if not Path(path).is_file():
                raise WherefromError(f"{path!r} is not a file")
        module = load_module(a.ckpt).eval()
        if getattr(module, "codes", None) is None:
            raise WherefromError(f"--ckpt {a.ckpt!r} is not an encoded ensemble with codes")
        controls = control_codes(module.codes, True)
        single = load_module(a.single).eval() if a.single else None
        settings = {k: v for k, v in vars(a).items() if k in ("ckpt", "num_samples", "seed", "steps", "scheduler")}
        if (out / "settings.json").is_file() and json.loads((out / "settings.json").read_text()) != settings:
            raise WherefromError(f"--out {a.out!r} holds a run with other settings; pass another --out")
        write_json(out / "settings.json", settings)
    except WherefromError as e:
        print(f"database_scale: error: {one_line(e, 400)}", file=sys.stderr)
        sys.exit(2)
    run(a, module, controls, single, out)


def run(a: argparse.Namespace, module, controls: np.ndarray, single, out: Path) -> None:
    data = load_datamodule(a.ckpt)
    data.setup()
    sampler = module.sampler(seed=a.seed, steps=a.steps, scheduler=a.scheduler)
    codes, queries = sampler.codes, list(range(a.num_samples))
    cache = out / "linearization.npz"
    if cache.is_file():  # the Jacobian and the sampling time it is compared with, measured in one run
        with np.load(cache) as f:
            lin = Linearization(queries, torch.from_numpy(f["x0"]), torch.from_numpy(f["jacobian"]), torch.from_numpy(f["weights"]))
            t_jac, t_sample = float(f["seconds"]), float(f["sampling_seconds"])
        with torch.no_grad():  # the samples as the exact ablations draw them (the JVP primal rounds otherwise)
            samples = sampler.sample(queries)
    else:
        with torch.no_grad():  # the median of three sampling runs: one run's time varies by about 10%
            runs = [timed(sampler.sample, queries) for _ in range(3)]
        samples, t_sample = runs[0][0], float(np.median([t for _, t in runs]))
        print(f"one sampling run ({a.num_samples} samples, {a.steps} steps, {sampler.n} members): {t_sample:.1f} s", flush=True)
        lin, t_jac = timed(linearize, sampler, queries, batch_size=a.batch_size, progress=True)
        with atomic_path(cache) as tmp, tmp.open("wb") as f:
            np.savez(f, x0=lin.x0.numpy(), jacobian=lin.jacobian.numpy(), weights=lin.weights.numpy(), seconds=t_jac, sampling_seconds=t_sample)
    raw, t_raw = timed(synthetic_scores, lin, codes, data.num_images)
    controlled, t_ctrl = timed(synthetic_scores, lin, codes, data.num_images, controls)
    # how much of the raw scores' spread over the images the additive member effect explains, per sample
    member_share = 1 - controlled[:, codes.indices].var(1) / raw[:, codes.indices].var(1)
    top1 = top_in_split(controlled, codes.indices, 1)[:, 0]
    with torch.no_grad():
        without = exact_ablation(sampler, queries, top1.tolist(), a.batch_size, progress=True)
    rows = []  # per block of 16 samples: the samples, their top-1 training images, the counterfactuals
    for s in range(0, a.num_samples, 16):
        rows += [samples[s : s + 16], data.images[torch.as_tensor(top1[s : s + 16])].to(samples), without[s : s + 16]]
    save_grid(torch.cat(rows), out / "fig2.png", nrow=min(16, a.num_samples))
    rho = synthetic_agreement(sampler, raw, samples, a.agreement_top, a.batch_size, progress=True)
    quality = {"ensemble": recognised(module.generate(a.quality_samples, seed=a.seed + 1, steps=a.steps, scheduler=a.scheduler))}
    if single is not None:
        quality["single model"] = recognised(single.generate(a.quality_samples, seed=a.seed + 1, steps=a.steps, scheduler=a.scheduler))
    n = sampler.n
    lines = [
        f"Encoded ensemble: n = {n}, w = {codes.w}, N = {codes.num_images} training images, {len(controls)} unused codes as controls; "
        f"{a.num_samples} samples, {a.steps} {a.scheduler} steps.",
        "",
        "| what | value |",
        "|---|---|",
        f"| one sampling run (all samples; median of 3) | {t_sample:.1f} s |",
        f"| Jacobian (n = {n} forward-mode tangents) | {t_jac:.1f} s = **{t_jac / t_sample:.1f} sampling runs** (goal <= 1.5 n = {1.5 * n:g}) |",
        f"| scoring all {codes.num_images} images, raw / controlled | {t_raw:.3f} s / {t_ctrl:.3f} s |",
        f"| synthetic vs exact ablation, Spearman over each sample's top {a.agreement_top} (raw) | {Estimate.of(rho).summary('+.3f')} |",
        "| share of the raw scores' spread over the images that the additive member effect explains, median (10-90% of samples) | "
        f"{np.median(member_share):.3f} ({np.quantile(member_share, 0.1):.3f}-{np.quantile(member_share, 0.9):.3f}) |",
    ]
    lines += [f"| samples recognised as a digit, {name} ({a.quality_samples}) | {f.summary()} |" for name, f in quality.items()]
    lines += ["", f"Fig. 2: `{out / 'fig2.png'}` (per block of 16 samples: the samples, the training image whose synthetic ablation "
              "moves each most (controlled scores), the sample redrawn exactly without that image's members)."]  # fmt: skip
    text = "\n".join(lines)
    write_bytes(out / "database_scale.md", text + "\n")
    write_json(out / "database_scale.json", {"sampling_s": t_sample, "jacobian_s": t_jac, "jacobian_in_sampling_runs": t_jac / t_sample,
                                             "scoring_s": {"raw": t_raw, "controlled": t_ctrl}, "agreement": rho.tolist(), "top1": top1.tolist(), "member_share": member_share.tolist(),
                                             "quality": {k: v.to_dict() for k, v in quality.items()}})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
