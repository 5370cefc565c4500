"""``wherefrom ensemble assemble --members CKPT... --out CKPT``: join per-member runs into one ensemble."""

from __future__ import annotations

from wherefrom.errors import ArgumentParser, WherefromError


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="wherefrom ensemble", description="Encoded-ensemble utilities.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    asm = sub.add_parser(
        "assemble",
        help="join per-member checkpoints (`wherefrom fit ... --model.member i`) into one ensemble checkpoint",
        description="Checks that all members share the codes fingerprint and config, then writes one ensemble .ckpt.",
    )
    asm.add_argument("--members", nargs="+", required=True, metavar="CKPT", help="one checkpoint per member 0..n-1, any order")
    asm.add_argument("--out", required=True, metavar="CKPT", help="the ensemble checkpoint to write")
    a = p.parse_args(argv)
    if a.action != "assemble":
        raise WherefromError("missing action; run `wherefrom ensemble assemble --members CKPT... --out CKPT`")
    from wherefrom.ensemble.module import assemble

    out = assemble(a.members, a.out)
    print(f"wrote ensemble of {len(a.members)} members to {out}")
