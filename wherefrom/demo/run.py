"""The demo's run: the output folder it owns, the ensemble's fit, the queries, every attributor on
both query sets with the removal test, the LDS subset models in the background."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from wherefrom.attribution.protocol import Attribution
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import DigitsDataModule
from wherefrom.demo.config import (
    DemoConfig,
    datamodule,
    demo_attributors,
    fit_config,
    lds_benchmark,
)
from wherefrom.demo.report import (
    MethodResult,
    Timer,
    bar_chart,
    counterfactual_grid,
    results_json,
    winner,
    write_report,
)
from wherefrom.ensemble.synthetic import quadratic_measurement
from wherefrom.errors import Spell, WherefromError, keyword
from wherefrom.evaluation import lds
from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.evaluation.quality import Fraction, digit_labels, recognised
from wherefrom.evaluation.removal import remove
from wherefrom.fitting import join, start_fit, start_worker
from wherefrom.io import check_out_dir, save_grid, write_json, write_npy
from wherefrom.task import mix_seed

# subfolders of the output folder that a run owns (a rerun into the same folder replaces them)
OWNED = ("ensemble", "store", "methods", "lds")


MARKER = ".wherefrom-demo"  # written into the output folder by a demo run: marks it as the demo's own


def log(msg: str, start: float) -> None:
    print(f"[demo {time.perf_counter() - start:6.1f}s] {msg}", flush=True)


def train_ensemble(cfg: DemoConfig, out: Path):
    """The ensemble's fit with the capture callbacks, in a process of its own (DDP relaunches it for
    the other ranks; :func:`wherefrom.fitting.start_fit`); returns the module (eval mode)."""
    from wherefrom.checkpoint import load_module

    config = out / "ensemble" / "fit.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(fit_config(cfg, out), sort_keys=False))
    log_path = None if cfg.progress else out / "ensemble" / "fit.log"
    join([start_fit(config, log_path)], "the ensemble's fit", log_path)
    return load_module(out / "ensemble" / "checkpoints" / "last.ckpt")


def make_queries(cfg: DemoConfig, module, dm: DigitsDataModule) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """The two query sets and each query's class (the classifier's for samples, the true one for real digits)."""
    generated = module.generate(cfg.num_samples, seed=cfg.seed, steps=cfg.steps, scheduler=cfg.scheduler)
    real_ids = np.sort(np.random.default_rng(mix_seed(cfg.seed, 1)).choice(dm.held_out, size=cfg.real_queries, replace=False))
    queries = {"generated": generated, "real": dm.images[torch.as_tensor(real_ids, dtype=torch.long)]}
    classes = {"generated": digit_labels(generated), "real": dm.labels[real_ids]}
    return {k: v for k, v in queries.items() if len(v)}, classes


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


def prepare_out(out: Path, overwrite: bool = False, spell: Spell | None = None) -> None:
    """Make ``out`` ready for a run without losing anything the demo did not write.

    A new or empty folder is used as is; a previous demo run's folder (it holds
    :data:`MARKER`) has its :data:`OWNED` subfolders replaced; any other non-empty
    folder, or a file, is refused unless ``overwrite``. ``spell`` writes the options in messages.
    """
    o = spell or keyword("run")
    check_out_dir(out, o("out"))
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise WherefromError(f"{o('out')} {str(out)!r} holds files the demo did not write; pick a new folder or pass {o('overwrite')} to write into it")
    if (out / MARKER).is_file():
        for name in OWNED:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `wherefrom demo`; its subfolders are replaced by the next run into this folder\n")


def run(cfg: DemoConfig, out: str | Path, overwrite: bool = False, spell: Spell | None = None) -> Path:
    """Run the demo into ``out``; returns the report's path. ``cfg`` is validated on
    construction, so nothing in ``out`` is touched for a bad option; ``spell`` writes ``out``
    and ``overwrite`` in messages (default: as this function's keyword arguments)."""
    out = Path(out)
    start = time.perf_counter()
    prepare_out(out, overwrite, spell)
    timer = Timer()
    torch.set_num_threads(1)
    dm = datamodule(cfg)

    lds_proc = None
    if cfg.lds_subsets:  # the subset models train in the background, beside the ensemble
        config = lds_benchmark(cfg, out)
        bench = Benchmark.from_file(config)
        lds.write_subsets(bench)
        lds_proc = start_worker(lds.train_subsets, (bench,), out / "lds" / "train.log")
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
            join([lds_proc], "LDS subset training", out / "lds" / "train.log")
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
