"""The tuning curves that chose the attribution defaults (issue 10), on the tuning queries only.

    python benchmarks/lds_benchmark.py --config configs/lds_digits500.yaml tune
    python benchmarks/lds_benchmark.py --config configs/lds_digits500.yaml tune --curves "stored dimension" "query draws"

Every curve varies one setting around the defaults and grades it by LDS on the
*tuning* query sets (held-out digits and samples disjoint from the report sets,
another sampling seed). The table goes to ``out/tuning.md`` and ``out/tuning.json``;
the report queries are never read here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from common import (
    Context,
    attribute_all,
    ensemble_loss_method,
    grade,
    kfac_method,
    measure_all,
    stored_method,
    trak_method,
    unprojected_method,
)

from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.io import write_json

DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ROUND1 = dict(timesteps=10, allocation="uniform", proj_dim=2048)  # the defaults before tuning, pinned
KFAC_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
STORED_DIMS = (512, 2048, 8192, 32768, 131072, 196608, 262144, 393216, 1 << 20)  # 1 << 20 keeps every coordinate of the default UNet (701,345 parameters)
QUERY_DRAWS = (100, 300, 1000)
SETS = ["tuning_real", "tuning_generated"]


def curves() -> dict[str, dict[str, Callable[[Context], np.ndarray]]]:
    """curve name -> {variant name: method}."""
    out: dict[str, dict[str, Callable[[Context], np.ndarray]]] = {}
    for method, output in (("dtrak", "square_norm"), ("trak", "loss")):
        out[f"{method}: damping (structured, D=2048)"] = {f"{method} structured lambda={d:g}": trak_method(output, d, **ROUND1) for d in DAMPINGS}
        out[f"{method}: damping (dense, D=2048)"] = {f"{method} dense lambda={d:g}": trak_method(output, d, projection="dense", timesteps=10) for d in DAMPINGS}
        out[f"{method}: damping (unprojected)"] = {f"{method} unprojected lambda={d:g}": unprojected_method(output, d) for d in DAMPINGS}
        out[f"{method}: renormalised (ReTrac) unprojected"] = {f"{method} unprojected normalised lambda={d:g}": unprojected_method(output, d, normalize=True) for d in DAMPINGS}
        out[f"{method}: projection dimension and allocation (structured, lambda=1)"] = {
            f"{method} structured {a} D={dim} lambda={d:g}": trak_method(output, d, proj_dim=dim, allocation=a, timesteps=10)
            for a in ("uniform", "proportional")
            for dim in (2048, 8192, 32768)
            for d in (0.1, 1.0)
        }
        out[f"{method}: timesteps K (structured, D=2048)"] = {f"{method} structured K={k} lambda={d:g}": trak_method(output, d, **{**ROUND1, "timesteps": k}) for k in (10, 100) for d in (0.1, 1.0)}
        # round 2, after round 1 showed K as the largest lever: K x damping with the better allocation
        out[f"{method}: timesteps K x damping (structured proportional, D=2048)"] = {
            f"{method} structured proportional K={k} lambda={d:g}": trak_method(output, d, timesteps=k, allocation="proportional", proj_dim=2048)
            for k in (10, 50, 100)
            for d in (0.03, 0.1, 0.3, 1.0)
        }
    for ekfac in (False, True):
        name = "ekfac" if ekfac else "kfac"
        out[f"{name}: damping x measurement (1 factor pass)"] = {
            f"{name} passes=1 {m} lambda={d:g}": kfac_method(ekfac, m, None, 1, relative=d) for m in ("loss", "elbo", "square_norm") for d in KFAC_DAMPINGS
        }
        out[f"{name}: factor passes (draws per image)"] = {f"{name} passes={p} loss lambda={d:g}": kfac_method(ekfac, "loss", None, p, relative=d) for p in (1, 8) for d in KFAC_DAMPINGS}
        out[f"{name}: gradient draws K=100 (8 factor passes)"] = {
            f"{name} passes=8 K=100 loss lambda={d:g}": kfac_method(ekfac, "loss", None, 8, timesteps=100, relative=d) for d in (0.01, 0.03, 0.1, 1.0, 10.0, 100.0)
        }
        # issue 19: stored influence (eigenbasis block, optionally + a residual sketch) against its exact mode
        out[f"{name}: stored dimension (8 passes, K=100)"] = {
            **{f"{name} stored D={d} R={r}": stored_method(ekfac, d, r) for d, r in [(d, 0) for d in STORED_DIMS] + [(d, r) for d in (2048, 8192) for r in (2048, 8192)]},
            **{f"{name} stored D={d} R=0 bfloat16": stored_method(ekfac, d, dtype="bfloat16") for d in (262144, 1 << 20)},  # the stored precision
        }
        out[f"{name}: query draws (exact, 8 passes, K=100 training draws)"] = {
            f"{name} passes=8 K=100 Kq={kq} loss": kfac_method(ekfac, "loss", None, 8, timesteps=100, query_timesteps=kq) for kq in QUERY_DRAWS
        }
    # issue 21: the ensemble's signed scores, raw or minus the member effect fitted on unused codes
    out["ablation-loss: control (ensemble n=12, w=6)"] = {f"ablation-loss control={c}": ensemble_loss_method(c) for c in (False, True)}
    out["dtrak: query draws (structured proportional D=2048, K=100 training draws)"] = {
        f"dtrak structured proportional K=100 Kq={kq} lambda=0.1": trak_method("square_norm", 0.1, query_timesteps=kq, timesteps=100) for kq in QUERY_DRAWS
    }
    return out


def tune(bench: Benchmark, only: list[str] | None = None) -> str:
    """Compute and grade the curves (those whose name contains one of ``only``, when given)."""
    chosen = {c: m for c, m in curves().items() if not only or any(o in c for o in only)}
    scores = {curve: attribute_all(bench, methods, folder="tuning_scores") for curve, methods in chosen.items()}
    values, _ = measure_all(bench)
    lines, results = [], {}
    for curve, methods in chosen.items():
        graded = grade(bench, scores[curve], -values, SETS)
        lines += [f"\n### {curve}\n", "| variant | " + " | ".join(f"LDS, {s.replace('_', ' ')}" for s in SETS) + " |", "|---|---|---|"]
        for m, r in graded.items():
            lines.append(f"| {m} | " + " | ".join(r[s].summary() for s in SETS) + " |")
            results[m] = {s: {"mean": r[s].mean, "ci": [r[s].ci_low, r[s].ci_high]} for s in SETS}
    text = "\n".join(lines)
    suffix = "" if not only else "_" + "_".join(o.replace(" ", "-").replace(":", "") for o in only)
    (bench.out / f"tuning{suffix}.md").write_text(text + "\n")
    write_json(bench.out / f"tuning{suffix}.json", results)
    print(text)
    return text
