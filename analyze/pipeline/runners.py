"""Where the per-checkpoint tasks run: in this process, on a local process pool or on a Dask
cluster, with results identical in all three.

Identical results: a task's output depends only on its inputs, and every task runs on one
intra-op thread (`one_thread`), in this process, in a pool worker or on a Dask worker alike.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import sys
import uuid
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

import torch

from loaders.errors import TrainauditError

__all__ = ["TaskRunner", "SerialRunner", "PoolRunner", "DaskRunner", "make_runner", "one_thread", "DASK_HINT"]

DASK_HINT = "--scheduler needs dask.distributed: pip install 'trainaudit[dask]'"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Every task runs on one intra-op thread, wherever it runs (same bits everywhere)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class TaskRunner(Protocol):
    """Runs tasks (a top-level function and one picklable argument) and hands back results
    as they finish."""

    workers: int

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None: ...

    def next_done(self) -> tuple[Hashable, Any]: ...

    def close(self) -> None: ...


class SerialRunner:
    """In this process, in submission order."""

    workers = 1

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[Hashable, Callable[[Any], Any], Any]] = collections.deque()

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.queue.append((tag, fn, arg))

    def next_done(self) -> tuple[Hashable, Any]:
        tag, fn, arg = self.queue.popleft()
        return tag, fn(arg)

    def close(self) -> None:
        self.queue.clear()


def _init_worker() -> None:
    torch.set_num_threads(1)


class PoolRunner:
    """A local process pool; each worker runs one task at a time on one thread (forked on Linux,
    spawned elsewhere)."""

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # fork: workers start in milliseconds with torch already imported, and need no importable
        # __main__ (a notebook, stdin); torch's DataLoader does the same. Elsewhere: spawn.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
        self.futures: dict[Any, Hashable] = {}
        self.done: collections.deque[Any] = collections.deque()

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.futures[self.pool.submit(fn, arg)] = tag

    def next_done(self) -> tuple[Hashable, Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        if not self.done:
            finished, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            self.done.extend(finished)
        fut = self.done.popleft()
        return self.futures.pop(fut), fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskRunner:
    """Tasks on a Dask distributed cluster. Workers must see the run's files at the same paths and
    be able to import trainaudit (and a --model factory, when one is given).

    Speed: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold, so every large torch allocation becomes a fresh mmap and a model pass
    runs ~1.6x slower; the worker's 10 ms stack profiler also takes the GIL from the task thread
    (benchmarks/scale.py). Start the workers with the dask config
    ``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`` and
    ``distributed.worker.profile.enabled: false``.
    """

    def __init__(self, address: str, timeout: float = 20.0) -> None:
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise TrainauditError(None, DASK_HINT) from None
        try:
            self.client = Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise TrainauditError(None, f"cannot reach the Dask scheduler at {address!r} "
                                        f"({type(exc).__name__}: {exc})") from None
        self.workers = max(1, sum(self.client.nthreads().values()))
        self.pending = as_completed([], with_results=False)
        self.tags: dict[str, Hashable] = {}
        self.prefix = f"trainaudit-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.count += 1
        fut = self.client.submit(fn, arg, pure=False, key=f"{self.prefix}-{self.count}")
        self.tags[fut.key] = tag
        self.pending.add(fut)

    def next_done(self) -> tuple[Hashable, Any]:
        fut = next(self.pending)
        result = fut.result()
        tag = self.tags.pop(fut.key)
        fut.release()
        return tag, result

    def close(self) -> None:
        self.client.close()


def make_runner(workers: int, scheduler: str | None = None) -> TaskRunner:
    """Dask when a scheduler address is given, else a process pool for workers > 1, else serial."""
    if scheduler:
        return DaskRunner(scheduler)
    if workers > 1:
        return PoolRunner(workers)
    return SerialRunner()
