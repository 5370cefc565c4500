"""``wherefrom attribute``: one command for every registered attributor.

The per-method options are the attributors' dataclass fields
(:data:`wherefrom.attribution.api.ATTRIBUTORS`), declared once each: a field several
methods share (``--damping``, ``--batch-size``) is one flag, choices come from the
enums, and a flag the chosen method does not take is refused. This module resolves
the run (:func:`wherefrom.cli.options.open_run`: wherefrom's checkpoints or any Lightning
module's), the queries, and writes the common outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

from wherefrom.attribution.ablation import SyntheticAblation
from wherefrom.attribution.api import ATTRIBUTORS, attributor, register
from wherefrom.attribution.average import attribute_models
from wherefrom.attribution.protocol import Attributor, Needs
from wherefrom.attribution.report import write_attribution
from wherefrom.checkpoint import import_class
from wherefrom.cli.options import (
    add_memory,
    add_run,
    add_sampling,
    condition_texts,
    flag,
    load_queries,
    open_runs,
    query_cond,
    query_conditions,
    set_memory,
)
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom.errors import WherefromError
from wherefrom.io import check_out_dir
from wherefrom.sampling import sampling_plan

# options of the command itself (query generation, output); attributors with a field of the same name receive it
COMMAND_OPTIONS = ("seed", "steps", "scheduler", "top_k", "guidance")
# options of the run (:func:`~wherefrom.cli.options.add_run`): applied when it is opened, never passed to an attributor
RUN_OPTIONS = ("denoiser",)
# the command that writes what each kind of attributor reads, for the missing-store message
WRITER = {Needs.FEATURES: "featurize", Needs.FACTORS: "factors"}


@dataclasses.dataclass
class Option:
    """One flag of ``wherefrom attribute``: a field shared by the attributors in ``methods``."""

    type: Any
    choices: list[str] | None
    methods: list[str]
    defaults: dict[str, Any]


def _field_type(hint: Any) -> tuple[Any, list[str] | None]:
    """The argparse type and choices of a dataclass field's hint (``X | None`` -> ``X``; enums and ``Literal`` give choices)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return str, [str(a) for a in typing.get_args(hint)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str, [e.value for e in hint]
    return hint, None


def method_options() -> dict[str, Option]:
    """Every field of every registered attributor, once (choices: the union over the methods that take it)."""
    options: dict[str, Option] = {}
    for name, cls in ATTRIBUTORS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ, choices = _field_type(hints[f.name])
            opt = options.setdefault(f.name, Option(typ, choices, [], {}))
            if choices:
                opt.choices = list(dict.fromkeys([*(opt.choices or []), *choices]))
            opt.methods.append(name)
            opt.defaults[name] = f.default.value if isinstance(f.default, enum.Enum) else f.default
    return options


def parser() -> argparse.ArgumentParser:
    units = "\n".join(f"  {name}: {cls.unit}" for name, cls in sorted(ATTRIBUTORS.items()))
    p = ConfigArgumentParser(
        prog="wherefrom attribute", description="Score every training image's influence on each query.",
        epilog=f"what a score means, per method (topk.json's \"unit\"):\n{units}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_run(p, several=True)
    p.add_argument("--method", required=True, choices=sorted(ATTRIBUTORS), help="attribution method (or your own attributor: package.module:Class)")
    p.add_argument("--out", required=True, help="folder for scores.npy, topk.json, topk.png")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--queries", nargs="+", default=None, help="samples.npy (N x C x H x W in [-1, 1]), image files or folders of them, or 'val'; default: generate --num-samples with --seed")
    p.add_argument("--num-samples", type=int, default=8)
    add_sampling(p, "generated queries")
    add_memory(p)
    group = p.add_argument_group("method options", "each applies to the methods listed; unset: the method's default")
    for name, opt in method_options().items():
        if name in COMMAND_OPTIONS or name in RUN_OPTIONS:
            continue
        shown = "; ".join(f"{m} {'auto' if opt.type is bool and opt.defaults[m] is None else opt.defaults[m]}" for m in opt.methods)
        if opt.type is bool:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=f"default: {shown}")
        else:
            choices = {"choices": opt.choices} if opt.choices else {}
            group.add_argument(flag(name), type=opt.type, default=None, help=f"default: {shown}", **choices)
    return p


def make_attributor(args: argparse.Namespace) -> Attributor:
    """The attributor of ``--method`` with the options given on the command line (a flag it does not take is refused)."""
    cls = ATTRIBUTORS[args.method]
    fields, options = {f.name for f in dataclasses.fields(cls)}, method_options()
    given = {k: v for k, v in vars(args).items() if k in options and k not in COMMAND_OPTIONS + RUN_OPTIONS and v is not None}
    stray = sorted(set(given) - fields)
    if stray:
        raise WherefromError(f"{flag(stray[0])} does not apply to --method {args.method}; its options are {', '.join(map(flag, sorted(fields))) or 'none'}")
    made = attributor(args.method, **given, **{k: getattr(args, k) for k in COMMAND_OPTIONS if k in fields})
    if cls.needs in WRITER and getattr(made, "store", None) is None:
        raise WherefromError(f"--method {args.method} needs --store, the folder written by `wherefrom {WRITER[cls.needs]}`")
    return made


def register_user_method(argv: list[str]) -> list[str]:
    """``--method package.module:Class``: import the user's attributor and :func:`~wherefrom.register` it before
    the flags are built (its fields become flags), then name it by its ``name``."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--method" and i + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--method=") else ""
        if ":" in value:
            cls = register(import_class(value.replace(":", "."), "--method"))
            argv[i : i + (2 if arg == "--method" else 1)] = ["--method", cls.name]
            break
    return argv


def attribute_main(argv: list[str]) -> None:
    argv = register_user_method(argv)  # before the parser: a user's attributor's fields become flags
    args = parser().parse_args(argv)
    check_out_dir(args.out, "--out")
    set_memory(args)
    method = make_attributor(args)
    if args.queries is not None and isinstance(method, SyntheticAblation):
        raise WherefromError(
            "--method ablation attributes the ensemble's own samples (it needs the sampler's exogenous noise); "
            "drop --queries and pass --num-samples and --seed"
        )
    if args.queries is None and min(args.num_samples, args.steps) < 1:
        raise WherefromError(f"--num-samples and --steps must be >= 1, got {args.num_samples} and {args.steps}")
    modules, data, datas = open_runs(args, "wherefrom attribute")
    if len(modules) > 1 and isinstance(method, SyntheticAblation):
        raise WherefromError("--method ablation attributes one ensemble's own samples; pass one --ckpt")
    module = modules[0]  # generated queries are the first model's samples
    if args.queries is None:  # the model's own samples, seeded
        sampling_plan(module.task, args.steps, args.scheduler)  # --steps at most the model's T and --scheduler, checked before any work
        conditions = query_conditions(args, data, args.num_samples)
        query_cond(module, conditions, args.num_samples)  # a conditional network's missing --labels, before sampling
        queries = module.generate(args.num_samples, seed=args.seed, steps=args.steps, scheduler=args.scheduler, progress=True, **conditions)
    else:
        queries = load_queries(args.queries, data)
        conditions = query_conditions(args, data, len(queries))
    cond = query_cond(module, conditions, len(queries))
    result = attribute_models(method, modules, data, queries, cond, names=args.ckpt, datas=datas)
    result = dataclasses.replace(result, conditions=condition_texts(args, data, conditions, len(queries)))
    out = write_attribution(args.out, result, data.images, args.top_k, getattr(data, "decode", None), getattr(data, "group_ids", None))
    print(f"wrote {', '.join(str(out / f) for f in ('scores.npy', 'topk.json', 'topk.png'))}")
