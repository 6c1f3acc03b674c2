"""A function over a list of items in worker processes, results in the items' order; the end
of a process that has loaded torch."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import get_context
from typing import NoReturn, TypeVar

__all__ = ["default_workers", "exit_process", "process_map"]

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def exit_process(status: int = 0) -> NoReturn:
    """End this process with ``status``, skipping the interpreter's teardown.

    The exit handlers run (log files are flushed and closed, the children of ``multiprocessing``
    joined), then the process leaves without freeing every module's objects one by one: with
    torch, Detectron2 and open_clip loaded that teardown takes 1.1-1.3 s of one core (RESULTS.md), a
    noticeable part of a short run. Only for the end of a process that has closed its own
    files (a tool's ``main``, a run's worker process), never from a library call.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def process_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    start_method: str = "spawn",
    chunksize: int = 16,
) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` processes (this process for 1), in order.

    ``fn`` and the items must pickle (a module-level function or a ``functools.partial`` of
    one). ``start_method="fork"`` starts the workers without importing anything again, for
    functions that use no threads of the parent (numpy and PIL work, not torch); it falls back to
    "spawn" where fork is not the platform's safe choice (other systems than Linux).
    """
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    if start_method == "fork" and not sys.platform.startswith("linux"):
        start_method = "spawn"
    with get_context(start_method).Pool(min(workers, len(items))) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
