"""``wherefrom demo``: the end-to-end demo (:mod:`wherefrom.demo`) from the command line."""

from __future__ import annotations

import dataclasses

from wherefrom import demo
from wherefrom.cli.options import flag
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.demo import TINY, DemoConfig, run


def main(argv: list[str]) -> None:
    p = ConfigArgumentParser(prog="wherefrom demo", description=demo.__doc__.split("\n\n")[0])
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
    a.pop("config")
    out, tiny, quiet, overwrite = a.pop("out"), a.pop("tiny"), a.pop("quiet"), a.pop("overwrite")
    values = {**(TINY if tiny else {}), **{k: v for k, v in a.items() if v is not None}}
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    if quiet:
        values["progress"] = False
    run(DemoConfig(**values, spell=flag), out, overwrite, flag)
