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
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from wherefrom.errors import WherefromError, one_line

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# name -> ("module:function", one-line help); each function takes its argv list.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("wherefrom.cli.sample:sample_main", "generate samples from a checkpoint"),
    "export": ("wherefrom.cli.sample:export_main", "export a checkpoint's UNet in diffusers format"),
    "featurize": ("wherefrom.cli.featurize:featurize_main", "TRAK / D-TRAK features of a run into a store"),
    "factors": ("wherefrom.cli.factors:factors_main", "K-FAC / EK-FAC factors of a run into a store"),
    "attribute": ("wherefrom.cli.attribute:attribute_main", "score training images' influence on queries"),
    "view": ("wherefrom.cli.view:view_main", "merge attribution runs over the same queries into one browsable report"),
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


class _Made:
    """The folders a LightningCLI run creates (its logs, saved config and checkpoints), removed when the
    run is refused before its first training step: a refused command leaves nothing behind."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.folders: list[Path] = []

    def before(self, trainer: Any) -> None:
        """Note, before the run, each output folder's first ancestor that does not exist yet."""
        self.trainer = trainer
        outputs = [trainer.default_root_dir, *(getattr(lg, "log_dir", None) for lg in trainer.loggers),
                   *(getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks)]  # fmt: skip
        for out in filter(None, outputs):
            path = Path(out).resolve()
            if path.exists():
                continue
            while not path.parent.exists():
                path = path.parent
            if path not in self.folders:
                self.folders.append(path)

    def undo(self) -> None:
        if self.trainer is not None and self.trainer.is_global_zero and self.trainer.global_step == 0:
            for path in self.folders:
                shutil.rmtree(path, ignore_errors=True)


def lightning_main(argv: list[str]) -> None:
    """LightningCLI; its parse errors, our constructors' errors and a missing ``--ckpt_path`` become
    one-line :class:`WherefromError` s, and a run refused before its first step leaves no folders."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    made = _Made()

    class CLI(LightningCLI):
        def before_fit(self) -> None:
            made.before(self.trainer)

        before_validate = before_test = before_predict = before_fit

    try:
        with warnings.catch_warnings():  # argv is passed explicitly (main, in-process tests, the LDS recipe)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            CLI(
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
        made.undo()
        raise
    except argparse.ArgumentError as e:
        cmd = argv[0] if argv and not argv[0].startswith("-") else "fit"
        raise WherefromError(_class_problem(one_line(e, 2000), cmd) or f"{one_line(e, 1000)}; see `wherefrom {cmd} --help`") from None
    except FileNotFoundError as e:
        made.undo()
        raise WherefromError(f"{e}; pass an existing checkpoint to --ckpt_path (or drop it to start from scratch)") from None
    except ValueError as e:  # jsonargparse wraps the errors of our constructors
        ours = _ours(e)
        if ours is None:
            raise
        made.undo()
        raise ours from None


# jsonargparse's union dump for a bad option of a --model / --data class: the key, the class, and its one problem
_CLASS_PROBLEM = re.compile(r'Parser key "(\w+)": Does not validate.*? - Problem with given class_path \'([\w.]+)\': (.*?) - Expected a <class \'NoneType\'>')


def _class_problem(message: str, cmd: str) -> str | None:
    """A bad option of a ``--model`` / ``--data`` class as one sentence (``None``: not that case),
    e.g. "DiffusionModel takes no option 'bogus'; see `wherefrom fit --print_config`"."""
    found = _CLASS_PROBLEM.search(message)
    if found is None:
        return None
    key, path, problem = found.groups()
    name = path.rpartition(".")[2]
    unknown = re.fullmatch(r"Option '([\w.]+)' is not accepted", problem)
    if unknown:
        return f"{name} takes no option {unknown.group(1)!r} (--{key}.{unknown.group(1)}); see `wherefrom {cmd} --print_config` for its options"
    return f"--{key} {path}: {problem.replace('Parser key', 'option')}; see `wherefrom {cmd} --print_config`"


def _usage() -> str:
    lines = ["usage: wherefrom COMMAND [options]", "", "commands:"]
    lines += [f"  {c:<12} LightningCLI {c} (--config YAML, --print_config)" for c in LIGHTNING_COMMANDS[:1]]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path and "" not in sys.path:  # a user's own package in the working directory, as `python -m` finds it
        sys.path.insert(0, os.getcwd())
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

