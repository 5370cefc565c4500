"""``wherefrom demo --out DIR``: the whole pipeline on the embedded digits, checked by its own numbers.

1. Train an encoded ensemble on ``num_images`` digits drawn at random (the rest are
   held out) with ``wherefrom fit`` from a generated LightningCLI config: the drop-in
   callbacks capture TRAK / D-TRAK features and K-FAC factors during the same fit,
   on ``devices`` CPU processes (DDP, gloo).
2. Queries: ``num_samples`` of the ensemble's samples (fixed exogenous noise) and
   ``real_queries`` held-out real digits. A digit classifier (:mod:`wherefrom.evaluation.quality`)
   says how many samples are recognisable digits.
3. Attribute both query sets with every registered attributor through the Python API
   (:data:`wherefrom.attribution.ATTRIBUTORS`), writing ``DIR/methods/<set>/<method>/``.
4. Evaluate without retraining (:mod:`wherefrom.evaluation.removal`): remove each query's
   top-``removal_k`` training images from the ensemble (drop every member that saw one)
   and measure the exact rise of the query's loss and, for samples, how far the sample
   moves, against ``removal_k`` random images; optionally an LDS over ``lds_subsets``
   retrained halves.
5. ``DIR/report.md``: which method won and by how much, every figure with its 95% interval,
   the sample-quality fractions, top-k and counterfactual grids, and the time per stage; beside
   it ``DIR/report/<set>/index.html``, every method's top-k side by side, query by query.

The defaults take under 10 minutes on 2 idle CPU cores; the size options scale it up
to the LDS benchmark (``--num-images 500 --lds-subsets 64 ...``), ``--tiny`` shrinks it to
seconds (tests).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from wherefrom.attribution.api import ATTRIBUTORS, attributor
from wherefrom.attribution.html import merge_reports
from wherefrom.attribution.protocol import Attribution
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble.codes import validate_codes
from wherefrom.ensemble.synthetic import quadratic_measurement
from wherefrom.errors import WherefromError
from wherefrom.evaluation import lds
from wherefrom.evaluation.benchmark import Benchmark, SamplingConfig
from wherefrom.evaluation.lds import Correlation
from wherefrom.evaluation.quality import Fraction, digit_labels, recognised
from wherefrom.evaluation.removal import Estimate, Removal, remove
from wherefrom.io import check_out_dir, save_grid, write_json, write_npy
from wherefrom.task import mix_seed

DIGITS = 1797
# the order of the report; attributors registered later are appended
METHOD_ORDER = ("ablation", "ablation-loss", "trak", "dtrak", "kfac", "ekfac", "pixel", "random")
BASELINES = ("pixel", "random")
QUERY_SETS = ("generated", "real")
# subfolders of --out that a run owns (a rerun into the same --out replaces them)
OWNED = ("ensemble", "store", "methods", "lds")
MARKER = ".wherefrom-demo"  # written into --out by a demo run: marks the folder as the demo's own


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: under 10 minutes on 2 idle CPU cores).

    ``num_images`` training digits are drawn at random (``seed``); C(members, code_weight) must
    cover them with distinct codes. ``batch_size`` is the global batch (split over ``devices``).
    ``timesteps`` are the seeded draws per TRAK gradient, ``measure_draws`` those of every
    loss in the evaluation (a different seed than the attributors').
    """

    num_images: int = 70
    members: int = 8
    code_weight: int = 4
    channels: tuple[int, int] = (32, 64)
    epochs: int = 500
    batch_size: int = 70
    lr: float = 2e-3
    num_samples: int = 32
    real_queries: int = 32
    steps: int = 50
    scheduler: str = "ddpm"
    top_k: int = 8
    removal_k: int = 1
    timesteps: int = 32
    proj_dim: int = 256
    measure_draws: int = 64
    lds_subsets: int = 0
    seed: int = 0
    devices: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.num_images < DIGITS:
            raise WherefromError(f"--num-images must be in [2, {DIGITS}), got {self.num_images}")
        for name in ("epochs", "batch_size", "num_samples", "steps", "top_k", "removal_k", "timesteps", "proj_dim", "measure_draws", "devices"):
            if getattr(self, name) < 1:
                raise WherefromError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.real_queries < 0 or self.real_queries > DIGITS - self.num_images:
            raise WherefromError(f"--real-queries must be in [0, {DIGITS - self.num_images}] (the held-out digits), got {self.real_queries}")
        if self.removal_k > self.num_images:
            raise WherefromError(f"--removal-k must be <= --num-images ({self.num_images}), got {self.removal_k}")
        if self.lds_subsets == 1 or self.lds_subsets < 0:
            raise WherefromError("--lds-subsets must be 0 (no LDS) or >= 2 (correlations need two points)")
        if self.batch_size % self.devices:
            raise WherefromError(f"--batch-size ({self.batch_size}) must be a multiple of --devices ({self.devices}): each process takes an equal share")
        if min(self.channels) < 1:
            raise WherefromError(f"--channels must be positive, got {self.channels}")
        SamplingConfig(self.seed, self.steps, self.scheduler)  # validates the scheduler
        validate_codes(self.num_images, self.members, self.code_weight)  # C(n, w) distinct codes for the images

    @property
    def unet(self) -> dict[str, Any]:
        c = list(self.channels)
        return dict(block_out_channels=c, norm_num_groups=min(8, c[0]), attention_head_dim=8)

    @property
    def member_batch_size(self) -> int:
        """Rows a member gets per ensemble batch: the LDS models' batch size (the members' recipe)."""
        return max(1, round(self.batch_size * self.code_weight / self.members))


TINY = dict(
    num_images=20, members=6, code_weight=3, channels=(8, 16), epochs=2, batch_size=10, num_samples=3, real_queries=3,
    steps=3, top_k=3, timesteps=2, proj_dim=16, measure_draws=2, lds_subsets=3, devices=1, progress=False,
)


class Timer:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def log(msg: str, start: float) -> None:
    print(f"[demo {time.perf_counter() - start:6.1f}s] {msg}", flush=True)


def datamodule(cfg: DemoConfig) -> DigitsDataModule:
    return DigitsDataModule(batch_size=cfg.batch_size, pool_size=cfg.num_images, pool_seed=cfg.seed)


def fit_config(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """The LightningCLI config of the ensemble's fit, with the capture callbacks (the K-FAC factors
    go into TRAK's store, beside the loss-gradient features its projected mode can reuse)."""
    features = dict(timesteps=cfg.timesteps, proj_dim=cfg.proj_dim, seed=cfg.seed)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "ensemble" / "checkpoints"), "filename": "last", "enable_version_counter": False, "every_n_epochs": cfg.epochs}},
        {"class_path": "wherefrom.callbacks.TRAKFeatures", "init_args": {"store": str(out / "store" / "trak"), "method": "trak", **features}},
        {"class_path": "wherefrom.callbacks.TRAKFeatures", "init_args": {"store": str(out / "store" / "dtrak"), "method": "dtrak", **features}},
        {"class_path": "wherefrom.callbacks.KFACFactors", "init_args": {"store": str(out / "store" / "trak"), "ekfac": True}},
    ]  # fmt: skip
    return {
        "seed_everything": cfg.seed,
        "trainer": {"max_epochs": cfg.epochs, "accelerator": "cpu", "devices": cfg.devices, "strategy": "ddp" if cfg.devices > 1 else "auto",
                    "logger": False, "enable_progress_bar": cfg.progress, "enable_model_summary": False,
                    "default_root_dir": str(out / "ensemble"), "callbacks": callbacks},
        "model": {"class_path": "wherefrom.EncodedEnsemble",
                  "init_args": {"n": cfg.members, "w": cfg.code_weight, "unet": cfg.unet, "lr": cfg.lr, "warmup": 0.05, "seed": cfg.seed}},
        "data": {"class_path": "wherefrom.DigitsDataModule",
                 "init_args": {"batch_size": cfg.batch_size // cfg.devices, "pool_size": cfg.num_images, "pool_seed": cfg.seed}},
    }  # fmt: skip


def run_command(args: list[str], log_path: Path, show: bool, threads: int = 1) -> subprocess.Popen:
    """``python -m wherefrom.cli ARGS`` with ``threads`` torch threads per process; output to
    ``log_path`` (and the terminal when ``show``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:  # the child keeps its own copy of the descriptor
        target = None if show else log_file
        return subprocess.Popen([sys.executable, "-m", "wherefrom.cli", *args], env=env, stdout=target, stderr=subprocess.STDOUT if target else None)


def wait(proc: subprocess.Popen, what: str, log_path: Path) -> None:
    if proc.wait() != 0:
        tail = log_path.read_text()[-1500:] if log_path.stat().st_size else "(see the output above)"
        raise WherefromError(f"{what} failed with exit code {proc.returncode} (log {log_path}): {tail}")


def train_ensemble(cfg: DemoConfig, out: Path):
    """``wherefrom fit`` of the ensemble with the capture callbacks; returns the module (eval mode)."""
    from wherefrom.checkpoint import load_module

    config = out / "ensemble" / "fit.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(fit_config(cfg, out), sort_keys=False))
    log_path = out / "ensemble" / "fit.log"
    wait(run_command(["fit", "--config", str(config)], log_path, cfg.progress), "the ensemble's fit", log_path)
    return load_module(out / "ensemble" / "checkpoints" / "last.ckpt")


def lds_benchmark(cfg: DemoConfig, out: Path) -> Path:
    """The LDS benchmark config: subset models are single DiffusionModels with the members'
    recipe (UNet, lr, epochs, rows per step), as TRAK's ensembles are models trained on random halves."""
    fit = {
        "seed_everything": cfg.seed,
        "trainer": {"max_epochs": cfg.epochs, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": cfg.unet, "lr": cfg.lr, "warmup": 0.05}},
        "data": {"class_path": "wherefrom.DigitsDataModule",
                 "init_args": {"batch_size": cfg.member_batch_size, "pool_size": cfg.num_images, "pool_seed": cfg.seed}},
    }  # fmt: skip
    bench = {
        "out": str(out / "lds"), "fit": fit, "model_seeds": [cfg.seed],
        "subsets": {"num": cfg.lds_subsets, "alpha": 0.5, "seed": cfg.seed},
        "measure": {"draws": cfg.measure_draws, "seed": cfg.seed + 1},
        "sampling": {"seed": cfg.seed, "steps": cfg.steps, "scheduler": cfg.scheduler},
    }  # fmt: skip
    path = out / "lds" / "benchmark.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(bench, sort_keys=False))
    return path


def make_queries(cfg: DemoConfig, module, dm: DigitsDataModule) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """The two query sets and each query's class (the classifier's for samples, the true one for real digits)."""
    generated = module.generate(cfg.num_samples, seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler)
    real_ids = np.sort(np.random.default_rng(mix_seed(cfg.seed, 1)).choice(dm.held_out, size=cfg.real_queries, replace=False))
    queries = {"generated": generated, "real": dm.images[torch.as_tensor(real_ids, dtype=torch.long)]}
    classes = {"generated": digit_labels(generated), "real": dm.labels[real_ids]}
    return {k: v for k, v in queries.items() if len(v)}, classes


def demo_attributors(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Every registered attributor, configured for the demo's stores and chain; others get their defaults."""
    # exact training gradients: in the demo they beat the projected mode (TRAK's D = 256 loss features) by
    # +0.0083 vs +0.0053 loss rise on the generated queries, for 22 s instead of 13 s
    kfac = dict(store=str(out / "store" / "trak"), grads="exact", timesteps=cfg.timesteps)
    options: dict[str, dict[str, Any]] = {
        "random": dict(seed=cfg.seed),
        "ablation": dict(seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler, top_k=cfg.top_k),
        "ablation-loss": dict(timesteps=cfg.measure_draws, seed=cfg.seed),
        "trak": dict(store=str(out / "store" / "trak")),
        "dtrak": dict(store=str(out / "store" / "dtrak")),
        "kfac": kfac,
        "ekfac": kfac,
    }
    names = [m for m in METHOD_ORDER if m in ATTRIBUTORS] + sorted(set(ATTRIBUTORS) - set(METHOD_ORDER))
    return {name: attributor(name, **options.get(name, {})) for name in names}


@dataclass
class MethodResult:
    """One method on one query set: the removal effects of its top-k and the top-1 class check."""

    attribution: Attribution
    removal: Removal
    top1_class: Fraction
    seconds: float
    lds: Correlation | None = None

    def loss(self) -> Estimate:
        return Estimate.of(self.removal.loss)

    def distance(self) -> Estimate | None:
        return None if self.removal.distance is None else Estimate.of(self.removal.distance)


def set_rows(queries: dict[str, Tensor], sets: list[str]) -> dict[str, slice]:
    """The rows of each query set in ``torch.cat([queries[s] for s in sets])``."""
    ends = np.cumsum([len(queries[s]) for s in sets])
    return {s: slice(int(end) - len(queries[s]), int(end)) for s, end in zip(sets, ends, strict=True)}


def rows_of(result: Attribution, rows: slice, queries: Tensor) -> Attribution:
    """The part of ``result`` for the queries at ``rows`` (scores, per-query extras and artifacts)."""
    return dataclasses.replace(result, scores=result.scores[rows], queries=queries, extra=result.extra[rows],
                               artifacts={k: v[rows] for k, v in result.artifacts.items()})  # fmt: skip


def attribute_and_remove(cfg: DemoConfig, module, dm, methods: dict[str, Any], queries: dict[str, Tensor], classes: dict[str, np.ndarray],
                         timer: Timer, out: Path, start: float) -> tuple[dict[str, dict[str, MethodResult]], dict[str, str]]:
    """Every method on every query set (one call per method over all its sets, so training gradients are
    formed once), written to ``out/methods/<set>/<method>``, then each query's top-k removed."""
    sampler = module.sampler(seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler)
    results: dict[str, dict[str, MethodResult]] = {s: {} for s in queries}
    status: dict[str, str] = {}
    with timer.phase("evaluation: query losses"):
        measurements = {s: quadratic_measurement(sampler, q, "loss", cfg.measure_draws, seed=cfg.seed + 1) for s, q in queries.items()}
    for name, method in methods.items():
        sets = [s for s in queries if name != "ablation" or s == "generated"]  # synthetic ablation: the ensemble's own samples
        if name == "ablation" and "real" in queries:
            status[f"{name}/real"] = "generated queries only (it attributes the ensemble's own samples)"
        log(f"{name} on {' and '.join(sets)} queries", start)
        t0 = time.perf_counter()
        try:
            result = method.attribute(module, dm, torch.cat([queries[s] for s in sets]))
        except WherefromError as e:  # e.g. an attributor that needs a store the demo does not make
            status.update({f"{name}/{s}": f"skipped: {e}" for s in sets})
            log(f"{name} skipped: {e}", start)
            continue
        seconds = time.perf_counter() - t0
        timer.seconds[f"attribute:{name}"] = seconds
        for qset, rows in set_rows(queries, sets).items():
            q = queries[qset]
            part = rows_of(result, rows, q)
            write_attribution(out / "methods" / qset / name, part, dm.images, cfg.top_k)
            top, _ = part.topk(cfg.removal_k)
            with timer.phase("evaluation: removal"):
                removal = remove(sampler, measurements[qset], top, q if qset == "generated" else None)
            same = int((dm.labels[top[:, 0]] == classes[qset]).sum())
            results[qset][name] = MethodResult(part, removal, Fraction(same, len(q)), seconds)
            status[f"{name}/{qset}"] = "ok"
    return results, status


def add_lds(cfg: DemoConfig, config: Path, queries: dict[str, Tensor], results: dict[str, dict[str, MethodResult]]) -> None:
    """Measure every subset model on both query sets and attach each method's LDS."""
    bench = Benchmark.from_file(config)
    sets = list(queries)
    values = lds.measure(bench, torch.cat([queries[s] for s in sets]))
    subsets, n = lds.read_subsets(bench)
    masks, targets = lds.subset_masks(subsets, n), -values.mean(axis=1)
    for s, cols in set_rows(queries, sets).items():
        for r in results[s].values():
            r.lds = lds.lds(r.attribution.scores.astype(np.float64), masks, targets[:, cols], bench.bootstrap)


def winner(results: dict[str, MethodResult]) -> str:
    """The method whose top-k removal raises the queries' loss the most (mean over queries)."""
    return max(results, key=lambda m: results[m].loss().mean)


def counterfactual_grid(queries: Tensor, results: dict[str, MethodResult], best: str, path: Path) -> dict[str, Fraction]:
    """Queries, then the ensemble without the winner's top-k, then without k random images; and how many
    of each row the digit classifier recognises."""
    rows = {"samples": queries, best: results[best].removal.samples, "random": results["random"].removal.samples}
    save_grid(torch.cat([r.float().cpu() for r in rows.values()]), path, nrow=len(queries))
    return {k: recognised(v) for k, v in rows.items()}


def bar_chart(results: dict[str, dict[str, MethodResult]], path: Path) -> None:
    """The rise of the query loss when each method's top-k is removed, per query set, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    methods = list(dict.fromkeys(m for s in sets for m in results[s]))
    x = np.arange(len(methods))
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.5))
    for k, s in enumerate(sets):
        est = [results[s][m].loss() if m in results[s] else Estimate(np.nan, np.nan, np.nan, 0) for m in methods]
        mean = np.array([e.mean for e in est])
        err = np.nan_to_num(np.abs(np.array([[e.mean - e.ci_low, e.ci_high - e.mean] for e in est]).T))
        ax.bar(x + (k - (len(sets) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=f"{s} queries")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylabel("loss rise when top-k removed\n(mean, 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired(a: MethodResult, b: MethodResult) -> Estimate:
    """The per-query difference of two methods' loss rises (same queries, same removal test), with its interval."""
    return Estimate.of(a.removal.loss - b.removal.loss)


def verdict(qset: str, results: dict[str, MethodResult], k: int) -> list[str]:
    """Which method won on ``qset``, by how much, against random and pixel similarity, in plain words."""
    best = winner(results)
    b, r = results[best].loss(), results["random"].loss()
    pixel = results.get("pixel")
    lines = [
        f"**{qset} queries: {best} won.** Removing each query's top-{k} by {best} raised the query's loss by {b.summary()} "
        f"on average, {b.mean / r.mean:.1f}x removing {k} random image{'s' if k > 1 else ''} ({r.summary()}); its interval "
        + ("excludes" if b.excludes(r.mean) else "does **not** exclude")
        + " random's mean."
    ]
    if best == "ablation-loss" and k == 1:
        lines.append("(ablation-loss computes exactly this quantity for single images, on other noise draws: it is the ensemble's own "
                     "answer, so its lead shows the test measures what it should; the comparison that matters is the others against pixel similarity.)")
    if pixel is not None and best != "pixel":
        p, d = pixel.loss(), paired(results[best], pixel)
        lines.append(f"Pixel similarity's top-{k} raised it by {p.summary()}; {best} minus pixel, paired per query: {d.summary()}, "
                     + ("above it." if d.ci_low > 0 else "not clearly above it."))  # fmt: skip
    grad = {m: res for m, res in results.items() if m not in BASELINES and not m.startswith("ablation")}
    if grad:
        g = max(grad, key=lambda m: grad[m].loss().mean)
        line = f"Best gradient method: {g}, {grad[g].loss().summary()}"
        if pixel is not None:
            d = paired(grad[g], pixel)
            line += f"; minus pixel, paired: {d.summary()} (" + ("above" if d.ci_low > 0 else "below" if d.ci_high < 0 else "level with") + " pixel)"
        lines.append(line + ".")
    return lines


def write_report(out: Path, cfg: DemoConfig, results: dict[str, dict[str, MethodResult]], status: dict[str, str],
                 quality: dict[str, Fraction], timer: Timer, total: float) -> Path:
    k = cfg.removal_k
    lines = [
        "# wherefrom demo",
        "",
        f"An encoded ensemble of {cfg.members} members (code weight {cfg.code_weight}: each training image is seen by "
        f"{cfg.code_weight} members) trained {cfg.epochs} epochs on {cfg.num_images} digits drawn at random from the 1797 embedded ones; "
        f"{cfg.num_samples} generated queries ({cfg.scheduler.upper()}, {cfg.steps} steps, seed {cfg.seed}) and {cfg.real_queries} held-out "
        f"real digits. Total time {total:.0f} s on {cfg.devices} process(es).",
        "",
        "## Verdict",
        "",
        f"The test: remove a query's top-{k} training image{'s' if k > 1 else ''} from the ensemble by dropping every member that saw {'them' if k > 1 else 'it'}. "
        f"The remaining members never saw {'them' if k > 1 else 'it'}, so the query's loss under the reduced ensemble (and, for a sample, the sample redrawn with the same noise) "
        f"is the exact counterfactual without retraining. A method that found what made the query raises its loss more than removing {k} "
        f"random image{'s' if k > 1 else ''} does. Loss = the denoising loss over {cfg.measure_draws} seeded draws (other draws than the attributors'). "
        "Every figure is a mean over queries with its 95% bootstrap interval.",
        "",
    ]
    for qset, res in results.items():
        if "random" in res:
            lines += verdict(qset, res, k) + [""]
    lines += ["![evaluation](evaluation.png)", ""]
    lines += ["Browse every method's top-k side by side, query by query: " + ", ".join(f"[{qset} queries](report/{qset}/index.html)" for qset in results) + ".", ""]
    for qset, res in results.items():
        has_distance = qset == "generated"
        has_lds = any(r.lds is not None for r in res.values())
        head = f"| method | loss rise, top-{k} removed | " + (f"sample moved (L2), top-{k} removed | " if has_distance else "")
        head += ("LDS | " if has_lds else "") + "top-1 has the query's class (sanity) | seconds (all query sets) |"
        lines += [f"### {qset} queries", "", head, "|" + "---|" * (head.count("|") - 1)]
        for m, r in res.items():
            row = f"| {m} | {r.loss().summary()} | " + (f"{r.distance().summary('.3f')} | " if has_distance else "")
            row += (f"{r.lds.summary()} | " if has_lds else "") + f"{r.top1_class.summary()} | {r.seconds:.1f} |"
            lines.append(row)
        lines.append("")
    lines += [
        "The class column is a cheap sanity figure, not an evaluation: a sample's class is the digit classifier's guess.",
        "" if not any(r.lds for res in results.values() for r in res.values()) else
        f"LDS: Spearman over {cfg.lds_subsets} random halves between summed scores and the negated loss of a single model "
        "retrained on each half (the members' recipe).",
        "",
        "## Samples",
        "",
        "Generated queries (top row), the same noise after removing the winner's top-k (middle) and after removing k random images (bottom):",
        "",
        "![counterfactuals](counterfactuals.png)",
        "",
        "Recognised as digits (a classifier fitted on the 1797 real digits gives one class probability >= 0.7; the real held-out digits calibrate it):",
        "",
        "| images | recognised [95% CI] |",
        "|---|---|",
    ]
    lines += [f"| {name} | {f.summary()} |" for name, f in quality.items()]
    lines += ["", "## Top-k training images per method", "", "Each row: the query, then its most influential training images.", ""]
    for qset, res in results.items():
        for m in res:
            lines += [f"### {m}, {qset} queries", "", f"![{m} {qset}](methods/{qset}/{m}/topk.png)", ""]
    skipped = {m: s for m, s in status.items() if s != "ok"}
    if skipped:
        lines += ["Not run: " + "; ".join(f"{m} ({s})" for m, s in skipped.items()), ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in timer.seconds.items()]
    lines += [f"| **total** | {total:.1f} |", ""]
    figures = [f for f in (out / "evaluation.png", out / "counterfactuals.png") if f.is_file()]
    for qset, res in results.items():  # the browsable report of each query set's runs (wherefrom view), with the evaluation figures
        merge_reports([out / "methods" / qset / m for m in res], out / "report" / qset, figures)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def results_json(cfg: DemoConfig, results: dict[str, dict[str, MethodResult]], status: dict[str, str], quality: dict[str, Fraction],
                 timer: Timer, total: float) -> dict[str, Any]:
    def method(r: MethodResult) -> dict[str, Any]:
        d = {"loss_rise": dataclasses.asdict(r.loss()), "top1_class": r.top1_class.to_dict(), "seconds": r.seconds,
             "removed": r.removal.sets.tolist(), "loss_rise_per_query": r.removal.loss.tolist()}
        if r.removal.distance is not None:
            d["distance"] = dataclasses.asdict(r.distance())
        if r.lds is not None:
            d["lds"] = dataclasses.asdict(r.lds)
        return d

    return {
        "config": dataclasses.asdict(cfg), "status": status, "seconds": timer.seconds, "total_seconds": total,
        "quality": {k: v.to_dict() for k, v in quality.items()},
        "winner": {s: winner(res) for s, res in results.items() if res},
        "methods": {s: {m: method(r) for m, r in res.items()} for s, res in results.items()},
    }  # fmt: skip


def prepare_out(out: Path, overwrite: bool = False) -> None:
    """Make ``out`` ready for a run without losing anything the demo did not write.

    A new or empty folder is used as is; a previous demo run's folder (it holds
    :data:`MARKER`) has its :data:`OWNED` subfolders replaced; any other non-empty
    folder, or a file, is refused unless ``overwrite``.
    """
    check_out_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise WherefromError(f"--out {str(out)!r} holds files the demo did not write; pick a new folder or pass --overwrite to write into it")
    if (out / MARKER).is_file():
        for name in OWNED:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `wherefrom demo`; its subfolders are replaced by the next run into this folder\n")


def run(cfg: DemoConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Run the demo into ``out``; returns the report's path. ``cfg`` is validated on
    construction, so nothing in ``out`` is touched for a bad option."""
    out = Path(out)
    start = time.perf_counter()
    prepare_out(out, overwrite)
    timer = Timer()
    torch.set_num_threads(1)
    dm = datamodule(cfg)

    lds_proc = None
    if cfg.lds_subsets:  # the subset models train in the background, beside the ensemble
        config = lds_benchmark(cfg, out)
        lds.write_subsets(Benchmark.from_file(config))
        ids = [str(j) for j in range(cfg.lds_subsets)]
        lds_proc = run_command(["lds", "train", "--config", str(config), "--subset-id", *ids], out / "lds" / "train.log", False)
        log(f"LDS: training {cfg.lds_subsets} subset models in the background", start)

    log(f"training an encoded ensemble ({cfg.members} members, w={cfg.code_weight}) on {cfg.num_images} digits, "
        f"{cfg.devices} process(es), capturing TRAK/D-TRAK features and K-FAC factors", start)  # fmt: skip
    with timer.phase("train ensemble (incl. captures)"):
        module = train_ensemble(cfg, out)
    torch.set_num_threads(max(1, min(cfg.devices, os.cpu_count() or 1)) if lds_proc is None else 1)

    log(f"generating {cfg.num_samples} samples", start)
    with timer.phase("generate samples"):
        queries, classes = make_queries(cfg, module, dm)
    for name, q in queries.items():
        write_npy(out / f"{name}.npy", q.numpy().astype(np.float32))
        save_grid(q, out / f"{name}.png", nrow=min(len(q), 16))

    methods = demo_attributors(cfg, out)
    results, status = attribute_and_remove(cfg, module, dm, methods, queries, classes, timer, out, start)

    if lds_proc is not None:
        with timer.phase("LDS: wait for subset models"):
            wait(lds_proc, "LDS subset training", out / "lds" / "train.log")
        with timer.phase("LDS: measure"):
            add_lds(cfg, out / "lds" / "benchmark.yaml", queries, results)

    quality = {}
    if "generated" in results and "random" in results["generated"]:
        gen = results["generated"]
        best = winner(gen)
        quality = counterfactual_grid(queries["generated"], gen, best, out / "counterfactuals.png")
        quality = {"ensemble samples": quality["samples"], f"without {best}'s top-{cfg.removal_k}": quality[best],
                   f"without {cfg.removal_k} random": quality["random"]}  # fmt: skip
        if "real" in queries:
            quality["real held-out digits"] = recognised(queries["real"])
    bar_chart(results, out / "evaluation.png")
    total = time.perf_counter() - start
    write_json(out / "results.json", results_json(cfg, results, status, quality, timer, total))
    report = write_report(out, cfg, results, status, quality, timer, total)
    log(f"wrote {report}", start)
    return report
