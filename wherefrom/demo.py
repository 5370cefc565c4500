"""``wherefrom demo --out DIR``: the whole pipeline on the embedded digits, on a laptop CPU.

1. Train an encoded ensemble on the first ``num_images`` digits (the rest are
   held out), capturing TRAK / D-TRAK features and K-FAC factors through the
   drop-in callbacks during the same fit.
2. Generate ``num_samples`` queries with fixed exogenous noise.
3. Attribute them with every registered method (ablation, trak, dtrak, kfac,
   ekfac, random); each writes ``DIR/methods/<method>/{scores.npy,topk.json,topk.png}``.
4. A small LDS (Park et al. 2023): ``lds_subsets`` random halves of the
   training images, one single model each with the members' recipe (TRAK's own
   ensembles are models trained on random halves, like the members), measured
   on the queries.
5. The ensemble's exact leave-one-out for ``loo_indices`` training indices.
6. ``DIR/report.md``: sample grids, each method's top-k grid, a bar chart of
   every method's LDS and leave-one-out correlation, and a table of times.

Methods and callbacks are discovered at run time (``METHODS`` and
:mod:`wherefrom.callbacks`), so the demo reports whatever is installed. The
defaults take about 10 CPU-minutes (about 8 minutes on 2 idle cores); the size options scale it up,
``--tiny`` shrinks it to seconds (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
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

import lightning as L
import numpy as np
import torch
import yaml

from wherefrom.attribution.cli import METHODS, method_function
from wherefrom.attribution.cli import parser as attribute_parser
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble.codes import validate_codes
from wherefrom.errors import ArgumentParser, WherefromError
from wherefrom.evaluation import lds
from wherefrom.evaluation.benchmark import Benchmark, SamplingConfig
from wherefrom.evaluation.lds import Correlation
from wherefrom.evaluation.loo import leave_one_out, sample_indices
from wherefrom.io import check_out_dir, save_grid, write_json, write_npy

DIGITS = 1797
# the order of the report; methods registered later are appended
METHOD_ORDER = ("ablation", "trak", "dtrak", "kfac", "ekfac", "random")
# subfolders of --out that a run owns (a rerun into the same --out replaces them)
OWNED = ("ensemble", "store", "methods", "lds", "loo")
MARKER = ".wherefrom-demo"  # written into --out by a demo run: marks the folder as the demo's own


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: about 8 minutes on 2 idle CPU cores).

    ``threads`` are torch's intra-op threads: the 8x8 models gain little from
    more, and on a busy machine extra threads thrash (up to 30x slower measured on a loaded 2-core machine),
    so the cores are used by ``lds_workers`` processes training subset models.
    """

    num_images: int = 70
    members: int = 8
    code_weight: int = 4
    channels: tuple[int, int] = (16, 32)
    epochs: int = 100
    batch_size: int = 35
    lr: float = 2e-3
    num_samples: int = 8
    steps: int = 20
    scheduler: str = "ddim"
    top_k: int = 8
    timesteps: int = 4
    proj_dim: int = 256
    lds_subsets: int = 16
    lds_draws: int = 32
    loo_indices: int = 32
    seed: int = 0
    threads: int = 1
    lds_workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.num_images < DIGITS:
            raise WherefromError(f"--num-images must be in [2, {DIGITS}), got {self.num_images}")
        for name in ("epochs", "batch_size", "num_samples", "steps", "top_k", "timesteps", "proj_dim", "lds_draws"):
            if getattr(self, name) < 1:
                raise WherefromError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads < 1 or self.lds_workers < 1:
            raise WherefromError(f"--threads and --lds-workers must be >= 1, got {self.threads} and {self.lds_workers}")
        if self.lds_subsets < 2 or self.loo_indices < 2:
            raise WherefromError("--lds-subsets and --loo-indices must be >= 2 (correlations need two points)")
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
    num_images=20, members=6, code_weight=3, channels=(8, 16), epochs=1, batch_size=10, num_samples=2, steps=3,
    top_k=3, timesteps=1, proj_dim=16, lds_subsets=3, lds_draws=2, loo_indices=3, lds_workers=1, progress=False,
)


class Timer:
    """Wall-clock seconds per named phase; phases can be bracketed around callbacks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def bracket(self, name: str, callback: L.Callback) -> list[L.Callback]:
        """``[start, callback, stop]``: Lightning calls every hook on the callbacks in list
        order, so the time between the two edges of each hook is the callback's."""
        return [_Edge(self, name, True), callback, _Edge(self, name, False)]

    def mark(self, name: str, start: bool) -> None:
        if start:
            self._open[name] = time.perf_counter()
        elif name in self._open:
            self.add(name, time.perf_counter() - self._open.pop(name))


class _Edge(L.Callback):
    def __init__(self, timer: Timer, name: str, start: bool) -> None:
        self.timer, self.name, self.start = timer, name, start

    @property
    def state_key(self) -> str:
        return f"Timer[{self.name},{self.start}]"


def _edge_hook(self: _Edge, *args: Any, **kwargs: Any) -> None:
    self.timer.mark(self.name, self.start)


for _hook in (
    "setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end", "on_train_end", "on_fit_end",
):
    setattr(_Edge, _hook, _edge_hook)


def capture_callbacks(cfg: DemoConfig, store: Path) -> dict[str, L.Callback]:
    """The attribution callbacks that exist in this installation, by capture name.
    K-FAC shares TRAK's store: its projected mode reuses the loss-gradient features."""
    callbacks = importlib.import_module("wherefrom.callbacks")
    found: dict[str, L.Callback] = {}
    if hasattr(callbacks, "TRAKFeatures"):
        for method in ("trak", "dtrak"):
            found[method] = callbacks.TRAKFeatures(
                str(store / STORE_OF[method]), method=method, timesteps=cfg.timesteps, proj_dim=cfg.proj_dim, seed=cfg.seed
            )
    if hasattr(callbacks, "KFACFactors"):
        found["kfac"] = callbacks.KFACFactors(str(store / STORE_OF["kfac"]), ekfac=True)
    return found


# the captures each method's scores are computed from, and the store it reads
CAPTURES_OF = {"trak": ("trak",), "dtrak": ("dtrak",), "kfac": ("kfac", "trak"), "ekfac": ("kfac", "trak")}
STORE_OF = {"trak": "trak", "dtrak": "dtrak", "kfac": "trak", "ekfac": "trak"}
# method-specific options of `wherefrom attribute`
METHOD_ARGS = {"kfac": ["--grads", "projected"], "ekfac": ["--grads", "projected"]}


def available_methods() -> list[str]:
    return [m for m in METHOD_ORDER if m in METHODS] + sorted(set(METHODS) - set(METHOD_ORDER))


def log(msg: str, start: float) -> None:
    print(f"[demo {time.perf_counter() - start:6.1f}s] {msg}", flush=True)


def train_ensemble(cfg: DemoConfig, out: Path, timer: Timer) -> tuple[L.LightningModule, DigitsDataModule, Path, list[str]]:
    """Fit the encoded ensemble with the capture callbacks; returns module, data, checkpoint, captures."""
    from wherefrom.ensemble import EncodedEnsemble

    dm = DigitsDataModule(batch_size=cfg.batch_size, val_size=DIGITS - cfg.num_images)
    module = EncodedEnsemble(n=cfg.members, w=cfg.code_weight, unet=cfg.unet, lr=cfg.lr, warmup=0.05, seed=cfg.seed)
    captures = capture_callbacks(cfg, out / "store")
    callbacks = [cb for name, c in captures.items() for cb in timer.bracket(f"capture:{name}", c)]
    L.seed_everything(cfg.seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=cfg.progress, callbacks=callbacks, default_root_dir=out / "ensemble",
    )
    with timer.phase("train ensemble (incl. captures)"):
        trainer.fit(module, datamodule=dm)
    ckpt = out / "ensemble" / "ensemble.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), dm, ckpt, list(captures)


def attribute_all(cfg: DemoConfig, out: Path, ckpt: Path, module, dm, queries: torch.Tensor, timer: Timer, start: float) -> dict[str, str]:
    """Run every registered method; returns ``{method: "ok" or the reason it was skipped}``."""
    status = {}
    for method in available_methods():
        args = attribute_parser().parse_args(
            ["--ckpt", str(ckpt), "--method", method, "--out", str(out / "methods" / method), "--top-k", str(cfg.top_k),
             "--seed", str(cfg.seed), "--steps", str(cfg.steps), "--scheduler", cfg.scheduler, "--store", str(out / "store" / STORE_OF.get(method, method)), *METHOD_ARGS.get(method, [])]
        )
        log(f"attributing with {method}", start)
        try:
            with timer.phase(f"attribute:{method}"):
                result = method_function(method)(module, dm, queries, args)
        except WherefromError as e:  # e.g. a method whose capture callback is not installed
            status[method] = f"skipped: {e}"
            log(f"{method} skipped: {e}", start)
            continue
        write_attribution(args.out, result, dm.images, cfg.top_k)
        status[method] = "ok"
    return status


def lds_benchmark(cfg: DemoConfig, out: Path) -> Path:
    """Write the LDS benchmark config: subset models are single DiffusionModels with
    the members' recipe (UNet, lr, epochs, rows per step)."""
    fit = {
        "seed_everything": cfg.seed,
        "trainer": {"max_epochs": cfg.epochs, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": cfg.unet, "lr": cfg.lr, "warmup": 0.05}},
        "data": {"class_path": "wherefrom.DigitsDataModule",
                 "init_args": {"batch_size": cfg.member_batch_size, "val_size": DIGITS - cfg.num_images}},
    }
    bench = {
        "out": str(out / "lds"), "fit": fit, "model_seeds": [cfg.seed],
        "subsets": {"num": cfg.lds_subsets, "alpha": 0.5, "seed": cfg.seed},
        "measure": {"draws": cfg.lds_draws, "seed": cfg.seed},
        "sampling": {"seed": cfg.seed, "steps": cfg.steps, "scheduler": cfg.scheduler},
    }
    path = out / "lds" / "benchmark.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(bench, sort_keys=False))
    return path


def train_subset_models(cfg: DemoConfig, config: Path, bench: Benchmark) -> None:
    """``wherefrom lds train`` in ``lds_workers`` processes, each with a share of the subsets."""
    lds.write_subsets(bench)
    workers = min(cfg.lds_workers, cfg.lds_subsets)
    if workers == 1:
        lds.train_subsets(bench)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    procs = []
    with contextlib.ExitStack() as stack:
        for w in range(workers):
            ids = [str(j) for j in range(w, cfg.lds_subsets, workers)]
            log_path = bench.out / f"train_worker{w}.log"
            log_file = stack.enter_context(open(log_path, "w"))
            cmd = [sys.executable, "-m", "wherefrom.cli", "lds", "train", "--config", str(config), "--subset-id", *ids]
            procs.append((subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_path))
        for proc, _ in procs:
            proc.wait()
    failed = [path for proc, path in procs if proc.returncode != 0]
    if failed:
        raise WherefromError(f"an LDS training worker failed (log {failed[0]}): {failed[0].read_text()[-1500:]}")


def bar_chart(results: dict[str, dict[str, Correlation]], path: Path) -> None:
    """Grouped bars (LDS, leave-one-out) per method with bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    kinds = [("lds", "LDS (Spearman)"), ("loo", "leave-one-out (Spearman)")]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.5))
    for k, (key, label) in enumerate(kinds):
        vals = [results[m][key] for m in methods]
        mean = np.array([v.mean for v in vals])
        err = np.nan_to_num(np.abs(np.array([[v.mean - v.ci_low, v.ci_high - v.mean] for v in vals]).T))
        ax.bar(x + (k - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, methods)
    ax.set_ylabel("mean over queries (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, cfg: DemoConfig, status: dict[str, str], results: dict[str, dict[str, Correlation]],
                 timer: Timer, captures: list[str], total: float) -> Path:
    ok = [m for m, s in status.items() if s == "ok"]
    lines = [
        "# wherefrom demo",
        "",
        f"Encoded ensemble of {cfg.members} members (code weight {cfg.code_weight}) trained {cfg.epochs} epochs on the first "
        f"{cfg.num_images} embedded digits; {cfg.num_samples} queries sampled with {cfg.scheduler.upper()}, {cfg.steps} steps, seed {cfg.seed}. "
        f"Total time {total:.0f} s.",
        "",
        "## Samples",
        "",
        "Generated queries, then the same noise after exactly ablating each query's most influential sampled training image "
        "(largest leave-one-out distance):",
        "",
        "![samples](samples.png)",
        "",
        "![ablated](ablated.png)",
        "",
        "## Top-k training images per method",
        "",
        "Each row: the query, then its most influential training images.",
        "",
    ]
    for m in ok:
        lines += [f"### {m}", "", f"![{m}](methods/{m}/topk.png)", ""]
    lines += [
        "## Evaluation",
        "",
        f"LDS: Spearman correlation over {cfg.lds_subsets} random halves of the training images between the summed scores and the "
        f"negated query loss of a model retrained on each half ({cfg.lds_draws} fixed noise draws; single models with the members' "
        "recipe, as TRAK's ensembles are models trained on random halves). Leave-one-out: Spearman "
        f"correlation between the scores and the exact ensemble ablation distance (pixel L2) of {cfg.loo_indices} training images. "
        "Means over queries with 95% bootstrap intervals.",
        "",
        "![evaluation](evaluation.png)",
        "",
        "| method | LDS [95% CI] | leave-one-out [95% CI] | capture (s) | attribute (s) | total (s) |",
        "|---|---|---|---|---|---|",
    ]
    for m in ok:
        cap = sum(timer.seconds.get(f"capture:{c}", 0.0) for c in CAPTURES_OF.get(m, ()))
        att = timer.seconds[f"attribute:{m}"]
        r = results[m]
        lines.append(f"| {m} | {r['lds'].summary()} | {r['loo'].summary()} | {cap:.1f} | {att:.1f} | {cap + att:.1f} |")
    lines += ["", "Capture = time inside the callbacks a method reads, during the ensemble's fit (K-FAC's projected mode reuses TRAK's "
              "features, so kfac and ekfac count both; captures are shared, not additive); ablation needs none: the ensemble is its "
              "own statistic.", ""]
    skipped = {m: s for m, s in status.items() if s != "ok"}
    if skipped:
        lines += ["Skipped methods: " + "; ".join(f"{m} ({s})" for m, s in skipped.items()), ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in timer.seconds.items() if not name.startswith(("attribute:", "capture:"))]
    lines += [f"| **total** | {total:.1f} |", ""]
    if captures:
        lines += [f"Captured during training: {', '.join(captures)}.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def prepare_out(out: Path, overwrite: bool = False) -> None:
    """Make ``out`` ready for a run without losing anything the demo did not write.

    A new or empty folder is used as is; a previous demo run's folder (it holds
    :data:`MARKER`) has its :data:`OWNED` subfolders replaced; any other non-empty
    folder, or a file, is refused unless ``overwrite``.
    """
    check_out_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise WherefromError(f"--out {str(out)!r} holds files the demo did not write; pick a new folder or pass --overwrite to write into it")
    for name in OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `wherefrom demo`; its subfolders are replaced by the next run into this folder\n")


def run(cfg: DemoConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Run the demo into ``out``; returns the report's path. ``cfg`` is validated on
    construction, so nothing in ``out`` is touched for a bad option."""
    out = Path(out)
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    prepare_out(out, overwrite)
    timer = Timer()

    log(f"training an encoded ensemble ({cfg.members} members, w={cfg.code_weight}) on {cfg.num_images} digits", start)
    module, dm, ckpt, captures = train_ensemble(cfg, out, timer)

    log(f"generating {cfg.num_samples} samples", start)
    with timer.phase("generate samples"):
        queries = module.generate(cfg.num_samples, seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler)
    write_npy(out / "samples.npy", queries.numpy().astype(np.float32))
    save_grid(queries, out / "samples.png", nrow=cfg.num_samples)

    status = attribute_all(cfg, out, ckpt, module, dm, queries, timer, start)
    ok = [m for m, s in status.items() if s == "ok"]
    scores = {m: np.load(out / "methods" / m / "scores.npy") for m in ok}

    config = lds_benchmark(cfg, out)
    bench = Benchmark.from_file(config)
    log(f"LDS: training {cfg.lds_subsets} subset models ({min(cfg.lds_workers, cfg.lds_subsets)} processes)", start)
    with timer.phase("LDS: train subset models"):
        train_subset_models(cfg, config, bench)
    with timer.phase("LDS: measure"):
        lds.measure(bench, queries)
    with timer.phase("LDS: score"):
        lds_results = {m: lds.score(bench, s) for m, s in scores.items()}

    log(f"leave-one-out: exact ablation of {cfg.loo_indices} training images", start)
    with timer.phase("leave-one-out: exact ablation"):
        indices = sample_indices(dm.indices, cfg.loo_indices, cfg.seed)
        loo = leave_one_out(module, indices, cfg.num_samples, cfg.seed, cfg.steps, cfg.scheduler, progress=cfg.progress)
        sampler = module.sampler(seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler)
        top = loo.indices[loo.distances.argmax(1)]
        ablated = torch.cat([sampler.sample([q], sampler.ablation_weights([int(i)])) for q, i in enumerate(top)])
    save_grid(ablated, out / "ablated.png", nrow=cfg.num_samples)
    write_npy(out / "loo" / "distances.npy", loo.distances)
    results = {m: {"lds": lds_results[m], "loo": loo.correlation(s)} for m, s in scores.items()}

    bar_chart(results, out / "evaluation.png")
    total = time.perf_counter() - start
    write_json(out / "results.json", {
        "config": dataclasses.asdict(cfg), "status": status, "seconds": timer.seconds, "total_seconds": total,
        "loo_indices": loo.indices.tolist(),
        "methods": {m: {k: dataclasses.asdict(v) for k, v in r.items()} for m, r in results.items()},
    })
    report = write_report(out, cfg, status, results, timer, captures, total)
    log(f"wrote {report}", start)
    return report


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="wherefrom demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (report.md and everything it shows)")
    p.add_argument("--tiny", action="store_true", help="seconds-sized run (for tests); size options still apply")
    defaults = DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        if f.name in ("progress", "channels"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None, help=f"default {getattr(defaults, f.name)}")
    p.add_argument("--channels", type=int, nargs=2, default=None, help=f"UNet block channels, default {defaults.channels}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that a demo run did not make")
    a = vars(p.parse_args(argv))
    out, tiny, quiet, overwrite = a.pop("out"), a.pop("tiny"), a.pop("quiet"), a.pop("overwrite")
    values = {**(TINY if tiny else {}), **{k: v for k, v in a.items() if v is not None}}
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    if quiet:
        values["progress"] = False
    run(DemoConfig(**values), out, overwrite)
