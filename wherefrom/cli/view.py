"""``wherefrom view RUN... --out DIR``: one browsable report of several attribution runs over the
same queries (e.g. one per method), from the folders ``wherefrom attribute`` wrote."""

from __future__ import annotations

from pathlib import Path

from wherefrom.attribution.html import merge_reports
from wherefrom.cli.options import add_overwrite
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.errors import WherefromError
from wherefrom.io import check_out_dir


def view_main(argv: list[str]) -> None:
    p = ConfigArgumentParser(prog="wherefrom view", description="Merge attribution runs over the same queries into one report (index.html).")
    p.add_argument("runs", nargs="+", help="folders written by `wherefrom attribute` (each holds index.html and images/)")
    p.add_argument("--out", required=True, help="folder for the merged index.html and its images/")
    p.add_argument("--figures", nargs="*", default=[], help="evaluation figures (PNGs, e.g. a demo's evaluation.png) shown below the runs")
    add_overwrite(p, "write into a non-empty --out (replacing same-named files)")
    a = p.parse_args(argv)
    out = check_out_dir(a.out, "--out")
    if any(out.resolve() == Path(r).resolve() for r in a.runs):
        raise WherefromError(f"--out {a.out!r} is one of the runs; pass a new folder")
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise WherefromError(f"--out {a.out!r} is not empty; pass a new folder, or --overwrite to write into it (replacing same-named files)")
    page = merge_reports(a.runs, out, a.figures)
    print(f"wrote {page} ({len(a.runs)} runs); open it in a browser")
