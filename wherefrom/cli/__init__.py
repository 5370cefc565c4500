"""``wherefrom`` command line: the only place that parses arguments.

``fit`` (and Lightning's ``validate``/``test``/``predict``) go through
LightningCLI, so YAML configs, ``--print_config`` and class paths for
``--model``/``--data`` work as in any Lightning project. The other commands,
registered in :data:`COMMANDS`, are jsonargparse programs in this package (one
module each; shared options in :mod:`wherefrom.cli.options`) with ``--config``
and ``--print_config`` too. Bad input raises :class:`~wherefrom.errors.WherefromError`;
``main`` prints its one-line message and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from wherefrom.errors import WherefromError, one_line

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# name -> ("module:function", one-line help); each function takes its argv list.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("wherefrom.cli.sample:sample_main", "generate samples from a checkpoint"),
    "export": ("wherefrom.cli.sample:export_main", "export a checkpoint's UNet in diffusers format"),
    "featurize": ("wherefrom.cli.featurize:featurize_main", "TRAK / D-TRAK features of a run into a store"),
    "factors": ("wherefrom.cli.factors:factors_main", "K-FAC / EK-FAC factors of a run into a store"),
    "attribute": ("wherefrom.cli.attribute:attribute_main", "score training images' influence on queries"),
    "lds": ("wherefrom.cli.evaluate:lds_main", "linear datamodelling score: subsets, train, measure, score"),
    "counterfactual": ("wherefrom.cli.evaluate:counterfactual_main", "retrain without each query's top influences and compare"),
    "loo": ("wherefrom.cli.evaluate:loo_main", "grade methods against an encoded ensemble's exact leave-one-out"),
    "demo": ("wherefrom.cli.demo:main", "run the end-to-end demo on the embedded digits"),
    "ensemble": ("wherefrom.cli.ensemble:main", "encoded ensembles: `ensemble assemble --members CKPT... --out CKPT`"),
}


def _ours(error: BaseException) -> WherefromError | None:
    """The WherefromError in an exception's chain (jsonargparse wraps constructor errors)."""
    while error is not None:
        if isinstance(error, WherefromError):
            return error
        error = error.__cause__ or error.__context__
    return None


def lightning_main(argv: list[str]) -> None:
    """LightningCLI; its parse errors, our constructors' errors and a missing
    ``--ckpt_path`` become one-line :class:`WherefromError` s."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    try:
        with warnings.catch_warnings():  # argv is passed explicitly (main, in-process tests, the LDS recipe)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            LightningCLI(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=argv,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
    except WherefromError:
        raise
    except argparse.ArgumentError as e:
        cmd = argv[0] if argv and not argv[0].startswith("-") else "fit"
        raise WherefromError(f"{one_line(e, 1000)}; see `wherefrom {cmd} --help`") from None
    except FileNotFoundError as e:
        raise WherefromError(f"{e}; pass an existing checkpoint to --ckpt_path (or drop it to start from scratch)") from None
    except ValueError as e:  # jsonargparse wraps the errors of our constructors
        ours = _ours(e)
        if ours is None:
            raise
        raise ours from None


def _usage() -> str:
    lines = ["usage: wherefrom COMMAND [options]", "", "commands:"]
    lines += [f"  {c:<12} LightningCLI {c} (--config YAML, --print_config)" for c in LIGHTNING_COMMANDS[:1]]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in LIGHTNING_COMMANDS:
            lightning_main(argv)
        elif cmd in COMMANDS:
            mod, _, fn = COMMANDS[cmd][0].partition(":")
            getattr(importlib.import_module(mod), fn)(rest)
        else:
            raise WherefromError(f"unknown command {cmd!r}; run `wherefrom --help` for the list")
    except WherefromError as e:
        print(f"wherefrom {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)

