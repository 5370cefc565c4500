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
import sys

from wherefrom.errors import WherefromError, one_line
from wherefrom.fitting import LIGHTNING_COMMANDS, run_lightning

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


# a module's or datamodule's argument as library messages write it: "DiffusionModel(num_classes=...)", "DigitsDataModule(conditional=True)"
_KEYWORD = re.compile(r"\b(\w+)\((\w+)=([^()]*)\)")


def _subclasses(base: type) -> set[str]:
    """The names of every subclass of ``base`` imported so far."""
    names, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names


def _in_flags(message: str) -> str:
    """A library message in LightningCLI's words: a LightningModule's argument as ``--model.<arg>``, a
    LightningDataModule's as ``--data.<arg>`` (with its value when the message gives one); other classes'
    arguments (a callback's) stay as they are, as the config file spells them too."""
    import lightning as L

    groups = {**dict.fromkeys(_subclasses(L.LightningModule), "model"), **dict.fromkeys(_subclasses(L.LightningDataModule), "data")}

    def spell(found: re.Match) -> str:
        cls, argument, value = found.groups()
        if cls not in groups:
            return found.group(0)
        flag = f"--{groups[cls]}.{argument}"
        return flag if value == "..." else f"{flag} {value.lower() if value in ('True', 'False') else value}"

    return _KEYWORD.sub(spell, message)


def lightning_main(argv: list[str]) -> None:
    """LightningCLI (:func:`wherefrom.fitting.run_lightning`); its parse errors, our constructors' errors
    and a missing ``--ckpt_path`` become one-line :class:`WherefromError` s in this command line's words."""
    try:
        run_lightning(argv)
    except WherefromError as e:
        raise type(e)(_in_flags(str(e))) from None
    except argparse.ArgumentError as e:
        cmd = argv[0] if argv and not argv[0].startswith("-") else "fit"
        raise WherefromError(_class_problem(one_line(e, 2000), cmd) or f"{one_line(e, 1000)}; see `wherefrom {cmd} --help`") from None
    except FileNotFoundError as e:
        raise WherefromError(f"{e}; pass an existing checkpoint to --ckpt_path (or drop it to start from scratch)") from None


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

