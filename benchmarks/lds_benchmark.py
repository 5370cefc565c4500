"""The standard LDS benchmark (issue 10): every method on held-out real and generated
queries, with 95% intervals, a pixel-similarity baseline, random and the noise ceiling.

    python benchmarks/lds_benchmark.py --config configs/lds_digits500.yaml all --workers 2
    python benchmarks/lds_benchmark.py --config configs/lds_digits500.yaml report      # the table again

Stages (each resumes where it stopped; ``all`` runs them in order):

* ``train``     the attributed model, the M subset models and the noise-ceiling seed
                (``wherefrom lds train --workers W``), and an encoded ensemble on the
                same split (n=12, w=6) for the signed ensemble scores.
* ``queries``   held-out real digits (outside the training pool) and the attributed
                model's samples: a *report* set and a disjoint *tuning* set of each.
* ``measure``   every subset model's loss on every query over ``measure.draws`` shared
                draws (one cached file per model).
* ``attribute`` every method's scores on all queries (one cached file per method).
* ``tune``      the tuning curves that chose the defaults (tuning queries only).
* ``report``    the LDS table of the report queries (markdown, and ``results.json``).

Defaults are chosen by ``tune`` on the tuning queries; ``report`` reads only the
report queries. Files live under the benchmark's ``out`` folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
from common import (
    Context,
    all_queries,
    attribute_all,
    ensemble_checkpoint,
    ensemble_influence_method,
    ensemble_influence_name,
    grade,
    header,
    kfac_method,
    make_queries,
    measure_all,
    pixel_method,
    random_method,
    stored_library_method,
    trak_method,
    tuned,
)

from wherefrom.attribution.trak import DAMPING
from wherefrom.evaluation import lds, stats
from wherefrom.evaluation.benchmark import Benchmark, train
from wherefrom.features import FeatureConfig
from wherefrom.io import write_json
from wherefrom.kfac import FactorConfig
from wherefrom.kfac.stored import InfluenceConfig

# The report: every method at its frozen library defaults (chosen by `tune` on the tuning
# queries), the projection comparison at K = 10, the pre-tuning defaults, and the baselines.
METHODS: dict[str, Callable[[Context], np.ndarray]] = {
    "dtrak": trak_method("square_norm", DAMPING["dtrak"]),
    "trak": trak_method("loss", DAMPING["trak"]),
    "kfac": kfac_method(False, "loss", None, FactorConfig.passes, timesteps=FeatureConfig.timesteps),
    "ekfac": kfac_method(True, "loss", None, FactorConfig.passes, timesteps=FeatureConfig.timesteps),
    f"kfac stored (D={InfluenceConfig.dim})": stored_library_method(False),
    f"ekfac stored (D={InfluenceConfig.dim})": stored_library_method(True),
    "ablation-loss (ensemble), raw": tuned("ablation-loss control=False"),
    "ablation-loss (ensemble), controlled": tuned("ablation-loss control=True"),
    ensemble_influence_name(): ensemble_influence_method(),
    "dtrak K=10 structured": tuned(f"dtrak structured proportional K=10 lambda={DAMPING['dtrak']:g}"),
    "dtrak K=10 dense": tuned(f"dtrak dense lambda={DAMPING['dtrak']:g}"),
    "dtrak K=10 unprojected": tuned(f"dtrak unprojected lambda={DAMPING['dtrak']:g}"),
    "trak K=10 structured": tuned(f"trak structured proportional K=10 lambda={DAMPING['trak']:g}"),
    "trak K=10 dense": tuned(f"trak dense lambda={DAMPING['trak']:g}"),
    "trak K=10 unprojected": tuned(f"trak unprojected lambda={DAMPING['trak']:g}"),
    "dtrak, old defaults (K=10, uniform, lambda=0.01)": tuned("dtrak structured lambda=0.01"),
    "trak, old defaults (K=10, uniform, lambda=0.01)": tuned("trak structured lambda=0.01"),
    "kfac, old defaults (1 pass, K=10)": tuned("kfac passes=1 loss lambda=0.1"),
    "pixel": pixel_method,
    "random": random_method,
}

# Paired differences the report prints (method minus reference, per query): what storing influence
# costs against exact mode (issue 19), what the unused-code controls change and what EK-FAC gains on the
# encoded ensemble's members over the single model (issue 21).
PAIRS: dict[str, str] = {
    f"kfac stored (D={InfluenceConfig.dim})": "kfac",
    f"ekfac stored (D={InfluenceConfig.dim})": "ekfac",
    "ablation-loss (ensemble), controlled": "ablation-loss (ensemble), raw",
    ensemble_influence_name(): "ekfac",
}


# --- reporting -------------------------------------------------------------------------


def noise_ceiling(bench: Benchmark, values: np.ndarray, ceiling: np.ndarray, sets: list[str]) -> dict[str, stats.Correlation]:
    """Spearman over the ceiling subsets of seed A's measurements against seed B's, per query."""
    _, rows = all_queries(bench)
    first = values[: len(ceiling)]
    return {s: stats.Correlation.of(stats.spearman_rows(-first[:, rows[s]].T, -ceiling[:, rows[s]].T), bench.bootstrap) for s in sets}


def table(results: dict[str, dict[str, stats.Correlation]], sets: list[str], ceiling: dict[str, stats.Correlation] | None) -> str:
    lines = header("method", [f"LDS, {s.replace('_', ' ')} [95% CI]" for s in sets])
    for m, r in results.items():
        lines.append(f"| {m} | " + " | ".join(r[s].summary() for s in sets) + " |")
    if ceiling:
        lines.append("| *noise ceiling (seed vs seed)* | " + " | ".join(ceiling[s].summary() for s in sets) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, dict[str, stats.Correlation]], sets: list[str], bootstrap: stats.BootstrapConfig) -> str:
    """LDS of each :data:`PAIRS` method minus its reference's, per query, with a bootstrap interval
    over queries (pairing removes the between-query spread both share)."""
    lines = header("method - reference", [s.replace("_", " ") for s in sets])
    for m, ref in PAIRS.items():
        if m in results and ref in results:
            diffs = [stats.Correlation.of(np.subtract(results[m][s].per_query, results[ref][s].per_query), bootstrap).summary() for s in sets]
            lines.append(f"| {m} - {ref} | " + " | ".join(diffs) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def calibration_table(bench: Benchmark, scores: dict[str, np.ndarray], losses: np.ndarray, sets: list[str]) -> str:
    """Per method and query set, how literally ``score / N`` predicts the subset models' measured
    loss differences (:func:`lds.calibration`; N: the attributed model's training images). Only
    influence methods (K-FAC, EK-FAC) claim slope 1; the others' scale is relative by design."""
    _, rows = all_queries(bench)
    subsets, n = lds.read_subsets(bench)
    masks, scale = lds.subset_masks(subsets, n), 1.0 / len(np.unique(subsets))
    lines = header("method", [f"slope, R^2 ({s.replace('_', ' ')})" for s in sets])
    for m, sc in scores.items():
        fits = [lds.calibration(sc[rows[s]], masks, losses[:, rows[s]], scale) for s in sets]
        lines.append(f"| {m} | " + " | ".join(f"{c.slope:.3g}, {c.r2:.3f}" for c in fits) + " |")
    return "\n".join(lines)


def report(bench: Benchmark, only: list[str] | None = None, tuning: bool = False) -> str:
    """The table of every method (those named in ``only``, when given) on the report queries (``tuning``:
    on the tuning queries, e.g. to check frozen defaults on another objective's model before reading the report)."""
    values, ceiling = measure_all(bench)
    scores = attribute_all(bench, {m: fn for m, fn in METHODS.items() if not only or m in only})
    sets = ["tuning_real", "tuning_generated"] if tuning else ["report_real", "report_generated"]
    suffix = "_tuning" if tuning else ""
    results = grade(bench, scores, -values, sets)
    ceil = noise_ceiling(bench, values, ceiling, sets) if ceiling is not None else None
    text = table(results, sets, ceil)
    if paired := paired_table(results, sets, bench.bootstrap):
        text += "\n\nPaired differences (LDS per query, 95% bootstrap CI)\n\n" + paired
    text += "\n\nCalibration: measured vs predicted (score / N) loss of the subset models\n\n" + calibration_table(bench, scores, values, sets)
    write_json(bench.out / f"results{suffix}.json", {m: {s: vars(c) for s, c in r.items()} for m, r in results.items()} | {"noise_ceiling": {s: vars(c) for s, c in (ceil or {}).items()}})
    (bench.out / f"results{suffix}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="benchmark config, e.g. configs/lds_digits500.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    p.add_argument("stage", choices=["train", "queries", "measure", "attribute", "tune", "report", "all"])
    p.add_argument("--workers", type=int, default=1, help="parallel training processes (train stage)")
    p.add_argument("--methods", nargs="+", default=None, help="attribute/report: only these methods (their names in the table)")
    p.add_argument("--curves", nargs="+", default=None, help="tune: only the curves whose name contains one of these")
    p.add_argument("--tuning", action="store_true", help="report: the table on the tuning queries instead")
    p.add_argument("--no-ensemble", action="store_true", help="train/all: skip the encoded ensemble (the objectives' benchmarks grade single models)")
    a = p.parse_args(argv)
    bench = Benchmark.from_file(a.config, a.out)
    start = time.perf_counter()
    if a.stage in ("train", "all"):
        train(bench, lds.full_model_dir(bench), bench.model_seeds[0])
        lds.train_subsets(bench, workers=a.workers)
        if not a.no_ensemble:
            ensemble_checkpoint(bench)
    if a.stage in ("queries", "all"):
        make_queries(bench)
    if a.stage in ("measure", "all"):
        measure_all(bench)
    if a.stage in ("attribute", "all"):
        attribute_all(bench, {m: fn for m, fn in METHODS.items() if not a.methods or m in a.methods})
    if a.stage == "tune":
        from tune_defaults import tune  # benchmarks/tune_defaults.py

        tune(bench, a.curves)
    if a.stage in ("report", "all"):
        print(report(bench, a.methods, a.tuning))
    print(f"[{a.stage}] {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
