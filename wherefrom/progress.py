"""Progress of long work, the way Lightning shows it: one bar on a terminal, plain lines in a log.

:func:`progress_bar` takes tqdm's arguments. On a terminal it is a tqdm bar (inner bars clear when
done), in a notebook tqdm's widget. Elsewhere (a CI log, ``nohup``, a pipe) it writes plain lines with no
escape codes, and only for the outermost piece of work: the first after its first timed item (what
it is, and the time left that item implies), then at each quarter, then the total.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

_active = [0]  # plain reporters running now: inner ones stay silent


class PlainProgress:
    """tqdm's ``update`` / ``close`` / iteration, reported as a few plain lines on stderr."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, silent: bool) -> None:
        self.iterable, self.desc, self.silent = iterable, desc or "working", silent
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start, self.next_quarter, self.closed = 0, time.perf_counter(), 1, False
        _active[0] += not silent

    def _say(self, text: str) -> None:
        if not self.silent:
            print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        first = self.n == 0
        self.n += n
        spent = time.perf_counter() - self.start
        if not self.total:
            if first:
                self._say(f"first {self.n} in {spent:.1f} s")
            return
        left = spent / self.n * (self.total - self.n)
        if first:
            self._say(f"{self.n}/{self.total} in {spent:.1f} s; about {_duration(left)} left")
        elif self.n < self.total and self.n >= self.next_quarter * self.total / 4:
            self._say(f"{self.n}/{self.total} ({100 * self.n // self.total}%); about {_duration(left)} left")
        while self.next_quarter * self.total / 4 <= self.n:
            self.next_quarter += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _active[0] -= not self.silent
            if self.n:
                self._say(f"done, {self.n}{f'/{self.total}' if self.total else ''} in {_duration(time.perf_counter() - self.start)}")

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def progress_bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None, disable: bool = False, leave: bool = True) -> Any:
    """A progress reporter over ``iterable`` (or one driven by ``update``): a tqdm bar on a terminal,
    plain lines otherwise (see the module docstring); ``disable``: none at all."""
    if not disable and (sys.stderr.isatty() or "ipykernel" in sys.modules):  # a terminal, or a notebook's widget
        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)
    return PlainProgress(iterable, desc or "", total, silent=disable or _active[0] > 0)


__all__ = ["PlainProgress", "progress_bar"]
