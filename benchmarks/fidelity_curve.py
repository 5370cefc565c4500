"""The fidelity threshold (issue 34): stored-influence fidelity against the LDS it costs, per budget.

    python benchmarks/fidelity_curve.py --config configs/lds_digits500_v.yaml [--ekfac]

For each stored budget ``dim`` of the tuning curve, on an LDS benchmark's attributed model (its 8-pass
factors): the library's fidelity (:func:`wherefrom.kfac.fidelity.fidelities`, 8 training images as
queries x 256 training images, K = 100) and the LDS of stored influence at that budget minus exact
mode's, per query and paired, on the tuning queries. The threshold the library warns below is the
lowest fidelity whose budget lost at most 0.02 LDS on both tuning sets. Run the benchmark's ``train``,
``queries`` and ``measure`` stages first; the stored rows reuse the tuning curve's cached scores.
"""

from __future__ import annotations

import argparse

import numpy as np
from common import Context, attribute_all, grade, kfac_method, measure_all, stored_method
from tune_defaults import STORED_DIMS

from wherefrom.evaluation import stats
from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.features import FeatureConfig
from wherefrom.kfac import FactorConfig, load_preconditioner
from wherefrom.kfac.fidelity import fidelities
from wherefrom.kfac.stored import InfluenceConfig, StoredInfluence, load_eigen

SETS = ["tuning_real", "tuning_generated"]
LOST = 0.02  # LDS a budget may lose against exact mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ekfac", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    bench = Benchmark.from_file(a.config, None)
    name = "ekfac" if a.ekfac else "kfac"
    exact = f"{name} passes=8 K=100 loss lambda=0.1"
    methods = {exact: kfac_method(a.ekfac, "loss", None, 8, timesteps=100, relative=0.1)}
    methods.update({f"{name} stored D={d} R=0": stored_method(a.ekfac, d) for d in STORED_DIMS})
    scores = attribute_all(bench, methods, folder="tuning_scores")
    values, _ = measure_all(bench)
    graded = grade(bench, scores, -values, SETS)

    ctx = Context(bench)
    store = ctx.factors(FactorConfig.passes)
    eigen = load_eigen(store, "model")[0]
    stored = [StoredInfluence(ctx.net, eigen, InfluenceConfig(dim=d, timesteps=FeatureConfig.timesteps, dtype="float32"), "model") for d in STORED_DIMS]
    preconditioner = load_preconditioner(store, "model", ctx.net, a.ekfac)
    measured, queries, train = fidelities(ctx.net, ctx.module.task, ctx.dm, ctx.split, stored, preconditioner)

    params = stored[0].num_params
    print(f"{name.upper()} stored against exact mode, {bench.out}: fidelity on {queries} x {train} training images (K = {FeatureConfig.timesteps}), "
          f"LDS on the tuning queries (paired per query, 95% bootstrap CI)\n")  # fmt: skip
    print("| dim | kept | fidelity Pearson r | fidelity Spearman r | LDS stored - exact, tuning real | tuning generated |")
    print("|---|---|---|---|---|---|")
    passing = []
    for s, (pearson, spearman) in zip(stored, measured):
        m = f"{name} stored D={s.config.dim} R=0"
        diffs = [stats.Correlation.of(np.subtract(graded[m][k].per_query, graded[exact][k].per_query), bench.bootstrap) for k in SETS]
        print(f"| {s.config.dim} ({s.dim}) | {s.dim / params:.1%} | {pearson:.3f} | {spearman:.3f} | " + " | ".join(d.summary() for d in diffs) + " |")
        passing.append(((pearson, spearman), all(d.mean >= -LOST for d in diffs)))
    for j, which in enumerate(("Pearson", "Spearman")):
        good = [f[j] for f, ok in passing if ok]
        bad = [f[j] for f, ok in passing if not ok]
        print(f"\n{which} r: lowest of a budget within {LOST} LDS of exact mode {min(good, default=float('nan')):.3f}, "
              f"highest of a budget that lost more {max(bad, default=float('nan')):.3f}", end="")
    print()


if __name__ == "__main__":
    main()
