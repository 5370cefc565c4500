"""What the demo found, in words and figures: the verdict per query set against random and pixel
similarity, the evaluation chart, the counterfactual grid, ``report.md`` and ``results.json``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.attribution.html import merge_reports
from wherefrom.attribution.protocol import Attribution
from wherefrom.demo.config import BASELINES, DemoConfig
from wherefrom.evaluation.quality import Fraction, recognised
from wherefrom.evaluation.removal import Estimate, Removal
from wherefrom.evaluation.stats import Correlation
from wherefrom.io import save_grid


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
