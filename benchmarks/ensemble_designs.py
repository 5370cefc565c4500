"""Which code design makes encoded-ensemble scores most like retraining (issue 21): ensembles of
several ``(n, w)`` on the LDS benchmark's split, trained with its recipe, their signed loss scores
(``ablation-loss``, raw and controlled) graded on the benchmark's subsets and query sets.

    python benchmarks/ensemble_designs.py --config configs/lds_digits500.yaml --designs 12x6 20x3 40x2
    python benchmarks/ensemble_designs.py --config configs/lds_digits500.yaml --designs 20x3 --sets report_real report_generated

Dropping an image's ``w`` members also drops ``w / n`` of every other image's presence, so a smaller
``w / n`` changes the ensemble less per ablation. Choose on the tuning sets (the default) before
reading the report sets. Each design trains once into ``out/models/ensemble_n{n}w{w}`` (the benchmark's
own n = 12, w = 6 is ``out/models/ensemble``); scores are cached under ``out/scores_designs``, so a rerun
resumes. Needs the benchmark's ``train``, ``queries`` and ``measure`` stages; the table goes to
``out/ensemble_designs_<sets>.md``.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from common import SETS, attribute_all, ensemble_loss_method, grade, header, measure_all

from wherefrom.ensemble.codes import validate_codes
from wherefrom.errors import WherefromError, one_line
from wherefrom.evaluation import lds
from wherefrom.evaluation.benchmark import Benchmark
from wherefrom.io import write_bytes


def parse_design(text: str) -> tuple[int, int]:
    """``"NxW"`` -> ``(n, w)``."""
    try:
        n, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise WherefromError(f"--designs takes NxW items such as 20x3, got {text!r}") from None
    return n, w


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="benchmark config, e.g. configs/lds_digits500.yaml")
    p.add_argument("--out", default=None, help="the benchmark's output folder (default: the config's `out`)")
    p.add_argument("--designs", nargs="+", required=True, help="code designs NxW (n members, code weight w), e.g. 12x6 20x3")
    p.add_argument("--sets", nargs="+", default=["tuning_real", "tuning_generated"], choices=SETS, help="query sets to grade on")
    a = p.parse_args(argv)
    try:
        bench = Benchmark.from_file(a.config, a.out)
        subsets, _ = lds.read_subsets(bench)
        split = len(np.unique(subsets))  # the attributed model's training images, which the ensembles train on
        designs = list(dict.fromkeys(parse_design(d) for d in a.designs))
        for n, w in designs:
            validate_codes(split, n, w)
    except (WherefromError, OSError) as e:
        print(f"ensemble_designs: error: {one_line(e, 400)}", file=sys.stderr)
        sys.exit(2)
    rows = {f"n={n}, w={w} ({control})": (n, w, control == "controlled") for n, w in designs for control in ("raw", "controlled")}
    # each design trains on first use (ensemble_loss_method -> ensemble_checkpoint)
    scores = attribute_all(bench, {name: ensemble_loss_method(c, n, w) for name, (n, w, c) in rows.items()}, folder="scores_designs")
    values, _ = measure_all(bench)
    results = grade(bench, scores, -values, a.sets)
    lines = [
        f"`ablation-loss` of encoded ensembles on the LDS benchmark's split ({split} images, {subsets.shape[0]} subsets); LDS with 95% bootstrap CI.",
        "",
        *header("design", ["w / n", "unused codes", *(s.replace("_", " ") for s in a.sets)]),
    ]
    for name, r in results.items():
        n, w, _ = rows[name]
        lines.append(f"| {name} | {w / n:.2f} | {math.comb(n, w) - split} | " + " | ".join(r[s].summary() for s in a.sets) + " |")
    text = "\n".join(lines)
    write_bytes(bench.out / f"ensemble_designs_{'_'.join(a.sets)}.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
