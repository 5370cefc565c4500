"""``wherefrom ensemble assemble --members CKPT... --out CKPT``: join per-member runs into one ensemble."""

from __future__ import annotations

from wherefrom.cli.parser import ConfigArgumentParser


def main(argv: list[str]) -> None:
    from wherefrom.ensemble.module import assemble

    p = ConfigArgumentParser(prog="wherefrom ensemble", description="Encoded-ensemble utilities.", config_file=False)
    sub = p.add_subcommands(dest="action", required=True)
    asm = ConfigArgumentParser(
        prog="wherefrom ensemble assemble",
        description="Checks that all members share the codes fingerprint and config, then writes one ensemble .ckpt.",
    )
    asm.add_argument("--members", nargs="+", required=True, metavar="CKPT", help="one checkpoint per member 0..n-1, any order")
    asm.add_argument("--out", required=True, metavar="CKPT", help="the ensemble checkpoint to write")
    sub.add_subcommand("assemble", asm, help="join per-member checkpoints (`wherefrom fit ... --model.member i`) into one ensemble checkpoint")
    a = p.parse_args(argv).assemble
    out = assemble(a.members, a.out)
    print(f"wrote ensemble of {len(a.members)} members to {out}")
