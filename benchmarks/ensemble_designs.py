"""Which code design makes encoded-ensemble scores most like retraining (issue 21): ensembles of
several ``(n, w)`` on the LDS benchmark's split, trained with its recipe, their signed loss scores
(``ablation-loss``, raw and controlled) and EK-FAC on their members (the library's defaults; the
benchmark's own design's scores are the LDS table's) graded on the benchmark's subsets and query sets.

    python benchmarks/ensemble_designs.py --config configs/lds_digits500.yaml --designs 12x6 20x3 40x2
    python benchmarks/ensemble_designs.py --config configs/lds_digits500.yaml --designs 20x3 --sets report_real report_generated
    python benchmarks/ensemble_designs.py --config configs/lds_digits500.yaml --designs 12x6 20x3 40x2 --ceiling 80x2 160x2 250x2 500x1

Dropping an image's ``w`` members also drops ``w / n`` of every other image's presence, so a smaller
``w / n`` changes the ensemble less per ablation. Choose on the tuning sets (the default) before
reading the report sets. Each design trains once into ``out/models/ensemble_n{n}w{w}`` (the benchmark's
own n = 12, w = 6 is ``out/models/ensemble``); scores are cached under ``out/scores_designs``, so a rerun
resumes. Needs the benchmark's ``train``, ``queries`` and ``measure`` stages; the table goes to
``out/ensemble_designs_<sets>.md``.

The *member-span ceiling* bounds every score that adds up member by member, ``s(x) = alpha +
sum_{i in S(x)} beta_i`` (what dropping members measures to first order, and what the controls fit):
the LDS of EK-FAC's and pixel similarity's scores replaced by their least-squares fit of that form
over the design's codes, i.e. the best such a score could do if it knew those methods' answers.
It needs no training, so ``--ceiling`` adds designs the library cannot train (``n`` > 62: seeded
random distinct codes); ``500x1`` (one member per image) is EK-FAC itself, a check.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from common import SETS, attribute_all, ensemble_influence_method, ensemble_influence_name, ensemble_loss_method, grade, header, measure_all
from lds_benchmark import METHODS

from wherefrom.ensemble.codes import MAX_MEMBERS, Codes, validate_codes
from wherefrom.errors import WherefromError, one_line
from wherefrom.evaluation import lds
from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.io import write_bytes
from wherefrom.task import mix_seed

CEILING_METHODS = ("ekfac", "pixel")  # the LDS table's best method and the baseline every method must beat


def parse_design(text: str) -> tuple[int, int]:
    """``"NxW"`` -> ``(n, w)``."""
    try:
        n, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise WherefromError(f"--designs takes NxW items such as 20x3, got {text!r}") from None
    return n, w


def check_design(num_images: int, n: int, w: int) -> None:
    """Refuse a design whose ``C(n, w)`` codes cannot cover the images (the library's own check up to
    ``MAX_MEMBERS`` members, which it alone can train)."""
    if n <= MAX_MEMBERS:
        validate_codes(num_images, n, w)
    elif not 1 <= w < n or math.comb(n, w) < num_images:
        raise WherefromError(f"design {n}x{w} cannot give {num_images} images distinct codes: need 1 <= w < n and C(n, w) >= {num_images}")


def design_codes(split: np.ndarray, n: int, w: int, seed: int) -> np.ndarray:
    """N x n code rows of design ``(n, w)`` for the sorted ``split``: the codes an ensemble trained with
    ``seed`` gets (:meth:`Codes.generate`), or beyond ``MAX_MEMBERS`` seeded random distinct codes."""
    if n <= MAX_MEMBERS:
        return Codes.generate(split, n, w, seed).bits
    rng, seen = np.random.default_rng(mix_seed(seed, n, w, len(split))), set()
    while len(seen) < len(split):
        seen.add(tuple(sorted(rng.choice(n, w, replace=False).tolist())))
    bits = np.zeros((len(split), n), dtype=bool)
    for row, code in enumerate(sorted(seen)):
        bits[row, list(code)] = True
    return bits[rng.permutation(len(split))]


def member_span(scores: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Each query's scores (Q x N) replaced by their least-squares fit ``alpha + sum_{i in S(x)} beta_i``
    over the code rows ``bits`` (N x n): the closest score that adds up member by member."""
    x = np.c_[np.ones(len(bits)), bits.astype(np.float64)]
    return (x @ np.linalg.lstsq(x, scores.T, rcond=None)[0]).T


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="benchmark config, e.g. configs/lds_digits500.yaml")
    p.add_argument("--out", default=None, help="the benchmark's output folder (default: the config's `out`)")
    p.add_argument("--designs", nargs="+", default=[], help="code designs NxW (n members, code weight w) to train and grade, e.g. 12x6 20x3")
    p.add_argument("--ceiling", nargs="+", default=[], help="more designs NxW for the member-span ceiling alone (no training; n may exceed 62)")
    p.add_argument("--sets", nargs="+", default=["tuning_real", "tuning_generated"], choices=SETS, help="query sets to grade on")
    a = p.parse_args(argv)
    try:
        bench = Benchmark.from_file(a.config, a.out)
        subsets, _ = lds.read_subsets(bench)
        indices = np.unique(subsets)  # the attributed model's training images, which the ensembles train on
        split = len(indices)
        if not a.designs and not a.ceiling:
            raise WherefromError("name designs to grade (--designs) or to bound (--ceiling), e.g. --designs 20x3")
        designs = list(dict.fromkeys(parse_design(d) for d in a.designs))
        extra = [parse_design(d) for d in a.ceiling]
        for n, w in designs:
            validate_codes(split, n, w)  # trainable designs: the library's own limits
        for n, w in extra:
            check_design(split, n, w)
        bounded = list(dict.fromkeys(designs + extra))
    except (WherefromError, OSError) as e:
        print(f"ensemble_designs: error: {one_line(e, 400)}", file=sys.stderr)
        sys.exit(2)
    rows = {f"n={n}, w={w} ({control})": (n, w, control == "controlled") for n, w in designs for control in ("raw", "controlled")}
    # each design trains on first use (ensemble_loss_method -> ensemble_checkpoint)
    scores = attribute_all(bench, {name: ensemble_loss_method(c, n, w) for name, (n, w, c) in rows.items()}, folder="scores_designs")
    # EK-FAC on each design's members, cached beside the LDS table's scores (which hold the benchmark's own design)
    scores |= attribute_all(bench, {ensemble_influence_name(n, w): ensemble_influence_method(n, w) for n, w in designs})
    rows |= {ensemble_influence_name(n, w): (n, w, False) for n, w in designs}
    values, _ = measure_all(bench)
    results = grade(bench, scores, -values, a.sets)
    lines = [f"Encoded-ensemble designs on the LDS benchmark's split ({split} images, {subsets.shape[0]} subsets); LDS with 95% bootstrap CI."]
    if designs:
        lines += ["", "`ablation-loss` and EK-FAC on the members of the trained designs.", "", *header("design", ["w / n", "unused codes", *(s.replace("_", " ") for s in a.sets)])]
    for name, r in results.items():
        n, w, _ = rows[name]
        lines.append(f"| {name} | {w / n:.2f} | {math.comb(n, w) - split} | " + " | ".join(r[s].summary() for s in a.sets) + " |")
    lines += ceiling_table(bench, indices, bounded, -values, a.sets)
    text = "\n".join(lines)
    write_bytes(bench.out / f"ensemble_designs_{'_'.join(a.sets)}.md", text + "\n")
    print(text)


def ceiling_table(bench: Benchmark, split: np.ndarray, designs: list[tuple[int, int]], targets: np.ndarray, sets: list[str]) -> list[str]:
    """The member-span ceiling of each design on the training ``split``: the LDS of :data:`CEILING_METHODS`'
    scores (the LDS table's cached ones) after :func:`member_span` over the design's codes, beside their own."""
    if not designs:
        return []
    scores = attribute_all(bench, {m: METHODS[m] for m in CEILING_METHODS})
    columns = [f"{m} {s.replace('_', ' ')}" for m in CEILING_METHODS for s in sets]
    lines = ["", f"Member-span ceiling: LDS of {' and '.join(CEILING_METHODS)} scores fitted as sums of member effects over each design's codes.", ""]
    lines += header("design", ["w / n", *columns])
    own = grade(bench, scores, targets, sets)
    lines.append("| (the methods themselves) | | " + " | ".join(own[m][s].summary() for m in CEILING_METHODS for s in sets) + " |")
    for n, w in designs:
        bits = design_codes(split, n, w, bench.model_seeds[0])
        projected = {}
        for m in CEILING_METHODS:
            projected[m] = np.zeros_like(scores[m])
            projected[m][:, split] = member_span(scores[m][:, split], bits)
        r = grade(bench, projected, targets, sets)
        lines.append(f"| n={n}, w={w} | {w / n:.3f} | " + " | ".join(r[m][s].summary() for m in CEILING_METHODS for s in sets) + " |")
    return lines


if __name__ == "__main__":
    main()
