"""Lightning runs from a config: the one way the command line, the benchmarks and the demo train.

:func:`run_lightning` is LightningCLI over any ``LightningModule`` / ``LightningDataModule``
(``class_path`` configs, YAML, the drop-in callbacks); ``wherefrom fit`` calls it with its
command line, :func:`fit` with a config dictionary (the content of a fit YAML).
A run refused before its first training step leaves none of the folders it would have created.

Some runs need a process of their own: a DDP fit (Lightning relaunches the running script for
the other ranks), and training that goes on while the caller works. :func:`start_fit` runs
``python -m wherefrom.fitting CONFIG.yaml``; :func:`start_worker` runs a function in a spawned
process with its own thread count and log; :func:`join` waits and names a failure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml

from wherefrom.errors import WherefromError, one_line

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def our_error(error: BaseException | None) -> WherefromError | None:
    """The WherefromError in an exception's chain (jsonargparse wraps constructor errors)."""
    while error is not None:
        if isinstance(error, WherefromError):
            return error
        error = error.__cause__ or error.__context__
    return None


class _Made:
    """The folders a LightningCLI run creates (its logs, saved config and checkpoints), removed when the
    run is refused before its first training step: a refused run leaves nothing behind."""

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


def run_lightning(args: list[str] | dict[str, Any]) -> None:
    """LightningCLI with ``args``: command-line style (``["fit", ...]``) or ``{command: config}``.

    Our constructors' errors are raised as the :class:`WherefromError` they are; the parser's
    ``argparse.ArgumentError`` and a missing ``ckpt_path``'s ``FileNotFoundError`` are raised
    as they are, for the caller to say in its own words. A run refused before its first step
    leaves no folders."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    made = _Made()

    class CLI(LightningCLI):
        def before_fit(self) -> None:
            made.before(self.trainer)

        before_validate = before_test = before_predict = before_fit

    try:
        with warnings.catch_warnings():  # args are passed explicitly (the command line, the benchmarks, tests)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            CLI(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
    except WherefromError:
        made.undo()
        raise
    except FileNotFoundError:
        made.undo()
        raise
    except ValueError as e:  # jsonargparse wraps the errors of our constructors
        ours = our_error(e)
        if ours is None:
            raise
        made.undo()
        raise ours from None


def fit(config: dict[str, Any], source: str = "the fit config") -> None:
    """Train from a fit config (what a ``fit`` YAML holds: ``trainer``, ``model``, ``data``, ...);
    ``source`` names it in errors."""
    try:
        run_lightning({"fit": config})
    except argparse.ArgumentError as e:
        raise WherefromError(f"{source}: {one_line(e, 1000)}") from None
    except FileNotFoundError as e:
        raise WherefromError(f"{source}: {e}") from None


def fit_file(path: str | Path) -> None:
    """:func:`fit` from a YAML file."""
    fit(yaml.safe_load(Path(path).read_text()), str(path))


def start_fit(config: Path, log: Path | None, threads: int = 1) -> subprocess.Popen:
    """``python -m wherefrom.fitting CONFIG`` (a DDP fit needs a script Lightning can relaunch) with
    ``threads`` torch threads per process; output to ``log`` (``None``: the terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if log is None:
        return subprocess.Popen([sys.executable, "-m", "wherefrom.fitting", str(config)], env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "wherefrom.fitting", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT)


def _worker(target: Callable[..., None], args: tuple, log: str | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    try:
        target(*args)
    except WherefromError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)


def start_worker(target: Callable[..., None], args: tuple, log: Path | None = None, threads: int = 1) -> BaseProcess:
    """Run ``target(*args)`` (a module-level function) in a spawned process with ``threads`` torch
    threads, its output to ``log`` (``None``: the terminal)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("spawn").Process(target=_worker, args=(target, args, None if log is None else str(log), threads))
    proc.start()
    return proc


def join(procs: Sequence[subprocess.Popen | BaseProcess], what: str, log: Path | None = None) -> None:
    """Wait for every process; raise naming ``what`` (and the tail of ``log``) if one failed."""
    codes = []
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            codes.append(proc.wait())
        else:
            proc.join()
            codes.append(proc.exitcode)
    failed = [c for c in codes if c != 0]
    if failed:
        tail = log.read_text()[-1500:] if log is not None and log.is_file() and log.stat().st_size else "(see the output above)"
        where = f" (log {log})" if log is not None else ""
        raise WherefromError(f"{what} failed with exit code {failed[0]}{where}: {tail}")


def main(argv: list[str] | None = None) -> None:
    """``python -m wherefrom.fitting CONFIG.yaml``: one fit; a refusal prints one line and exits 2."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m wherefrom.fitting CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    try:
        fit_file(argv[0])
    except WherefromError as e:
        print(f"wherefrom.fitting: error: {e}", file=sys.stderr)
        sys.exit(2)


__all__ = ["LIGHTNING_COMMANDS", "fit", "fit_file", "join", "our_error", "run_lightning", "start_fit", "start_worker"]


if __name__ == "__main__":
    main()

