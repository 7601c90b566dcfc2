"""Verifier worker processes with hard per-item deadlines.

math-verify's own timeout is SIGALRM-based and does nothing off the main thread, so items run in
a pebble ProcessPool: a worker past its item's deadline is killed and pebble starts a new one;
other items (and other requests) keep their workers.

Two details of pebble 5 shape this module:
- A task that is cancelled after it was handed to the workers' pipe, but before a worker
  acknowledged it, makes pebble kill whichever worker picks it up. So at most one task per
  worker is handed to pebble at a time (the `_slots` semaphore), and only tasks that are
  really running are ever cancelled.
- A worker that dies while idle (e.g. `kill -9`, the OOM killer) puts the whole pool in an
  error state. A watchdog replaces such a pool with a fresh one; items it had in flight are
  retried once if their deadline allows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import multiprocessing
import os
import signal
import time
from typing import Any, Callable

from pebble import ProcessExpired, ProcessPool

from reward_server.verifiers.base import Verdict, VerifyFn, error, run_verifier

log = logging.getLogger("aepo.reward.pool")
_WATCH_INTERVAL_S = 0.2
# pebble only stops a worker when it can take the workers' channel lock without blocking, which
# an idle worker waiting for a task holds; a stuck worker may thus keep burning a core until the
# next task arrives. The watchdog SIGKILLs a cancelled item's worker this long after the cancel.
_REAP_AFTER_S = 0.25
_PRELOAD = "reward_server._worker_preload"


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver with math-verify preloaded: workers start in milliseconds, already warm.

    Not plain fork: the server process has threads (uvicorn, Ray, pebble's own), and forking a
    threaded process can deadlock the child. The forkserver is single-threaded. Like spawn, it
    re-imports the parent's __main__ in each worker, so scripts that create the app need the
    usual `if __name__ == "__main__":` guard.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([_PRELOAD])  # no effect if this process's forkserver already runs
    return ctx


def _init_worker(memory_mb: int, plugins: list[str]) -> None:
    """Runs once in each new worker: SIGTERM, memory cap, plugin verifiers, warm-up (cheap if preloaded)."""
    # pebble stops a worker with SIGTERM and waits up to 3 s before SIGKILL, holding the lock of
    # the channel all workers share. Its Python-level SIGTERM handler cannot run while sympy is
    # inside one long C call (a 370-million-digit power), so every kill stalled the whole pool
    # for 3 s. The default action ends the process at once; pebble holds the channel lock while
    # it stops a worker, so the victim cannot be holding it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    for module in plugins:
        importlib.import_module(module)
    importlib.import_module(_PRELOAD)  # a no-op when the forkserver preloaded it


def _work(fn: VerifyFn, response: str, reference: Any) -> Verdict:
    """Task body in a worker: the verifier, with exceptions turned into `error` verdicts."""
    return run_verifier(fn, response, reference)


def _ping() -> bool:
    return True


class _Broken(Exception):
    """The pebble pool is unusable; the item may be retried on a fresh pool."""


class VerifierPool:
    """A self-healing pebble ProcessPool driven from asyncio, one in-flight item per worker."""

    def __init__(
        self,
        workers: int,
        item_time_limit_s: float,
        memory_mb: int = 0,
        max_tasks: int = 0,
        plugins: list[str] | None = None,
        on_restarts: Callable[[int], None] | None = None,
    ) -> None:
        self.workers = workers
        self.item_time_limit_s = item_time_limit_s
        self._memory_mb = memory_mb
        self._max_tasks = max_tasks
        self._plugins = list(plugins or [])
        self._on_restarts = on_restarts or (lambda n: None)
        self._pool: ProcessPool | None = None
        self._slots = asyncio.Semaphore(workers)
        self._warm = False
        self._closing = False
        self._known_pids: set[int] = set()
        self._tasks: list[asyncio.Task] = []
        self._cancelled: dict[concurrent.futures.Future, float] = {}  # cancelled running item -> when
        self._inflight: set[concurrent.futures.Future] = set()  # handed to pebble, not finished
        self._aborted: set[concurrent.futures.Future] = set()  # dropped with a broken pool: retry them
        self._rebuild_lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the pool and start warming it up; `ready` turns True once a worker answered."""
        self._pool = self._new_pool()
        self._tasks = [asyncio.create_task(self._warm_up()), asyncio.create_task(self._watch())]

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until `ready` (raises TimeoutError after timeout_s)."""
        end = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() > end:
                raise TimeoutError(f"verifier workers not ready after {timeout_s}s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop the watchdog and the workers."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, _stop_pool, pool)

    def _new_pool(self) -> ProcessPool:
        return ProcessPool(
            max_workers=self.workers,
            max_tasks=self._max_tasks,
            initializer=_init_worker,
            initargs=(self._memory_mb, self._plugins),
            context=_mp_context(),
        )

    async def _warm_up(self) -> None:
        self._warm = False
        pool = self._pool
        try:
            futures = [pool.schedule(_ping, timeout=None) for _ in range(self.workers)]
            await asyncio.wrap_future(futures[0])
            self._warm = pool is self._pool
        except Exception as exc:  # noqa: BLE001 - the watchdog rebuilds a broken pool
            log.warning("verifier pool warm-up failed: %r", exc)

    # ---- status ----------------------------------------------------------------------------
    def worker_pids(self) -> list[int] | None:
        """PIDs of the live worker processes; None if pebble's internals no longer show them."""
        try:
            workers = self._pool._pool_manager.worker_manager.workers  # type: ignore[union-attr]
            return sorted(pid for pid, proc in list(workers.items()) if proc.is_alive())
        except AttributeError:
            return None

    @property
    def ready(self) -> bool:
        """Warm, running, and at least one worker process alive."""
        pool = self._pool
        pids = self.worker_pids()
        return bool(self._warm and pool is not None and pool.active and (pids is None or pids))

    async def _watch(self) -> None:
        """Count replaced workers; replace a pool that pebble put in its error state."""
        while not self._closing:
            pids = set(self.worker_pids() or ())
            gone = len(self._known_pids - pids)
            if gone:
                self._on_restarts(gone)
            self._known_pids = pids
            if self._pool is not None and not self._pool.active:
                await self._rebuild()
            self._reap_stuck()
            await asyncio.sleep(_WATCH_INTERVAL_S)

    def _reap_stuck(self) -> None:
        """SIGKILL workers still running an item cancelled more than _REAP_AFTER_S ago.

        Such a task is still in pebble's table only while its worker has sent no result, i.e.
        it is still computing (not inside the channel's locked send/recv), so killing it cannot
        leave a channel lock held. pebble then sees the death and starts a replacement.
        """
        if not self._cancelled:
            return
        now = time.monotonic()
        try:
            tasks = list(self._pool._pool_manager.task_manager.tasks.values())  # type: ignore[union-attr]
        except AttributeError:
            tasks = []
        pids = {t.future: t.worker_id for t in tasks}
        for fut, since in list(self._cancelled.items()):
            pid = pids.get(fut)
            if not pid:  # finished, stopped by pebble, or from a replaced pool
                del self._cancelled[fut]
            elif now - since > _REAP_AFTER_S:
                del self._cancelled[fut]
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    async def _rebuild(self) -> None:
        async with self._rebuild_lock:
            old = self._pool
            if old is None or old.active or self._closing:
                return  # someone else rebuilt it already
            log.warning("verifier pool broke (a worker died while idle); starting a fresh one")
            lost = len(self._known_pids)
            self._known_pids = set()
            if lost:
                self._on_restarts(lost)
            self._pool = self._new_pool()
            # Items the old pool will never finish: resolve them (frees their slots) and retry.
            for fut in list(self._inflight):
                self._aborted.add(fut)
                fut.cancel()
            asyncio.get_running_loop().run_in_executor(None, _stop_pool, old)
            self._tasks.append(asyncio.create_task(self._warm_up()))

    # ---- running items ---------------------------------------------------------------------
    async def run(self, fn: VerifyFn, response: str, reference: Any, deadline: float) -> Verdict:
        """`fn(response, reference)` in a worker; a `timeout` verdict at `deadline` (monotonic) at the latest."""
        for _ in range(2):
            try:
                return await self._run_once(fn, response, reference, deadline)
            except _Broken as exc:
                broken = exc
                await self._rebuild()
        return error(f"verifier pool unavailable: {broken}")

    async def _run_once(self, fn: VerifyFn, response: str, reference: Any, deadline: float) -> Verdict:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self._slots.acquire()
        except TimeoutError:
            return Verdict("timeout", "deadline passed while waiting for a free verifier worker")
        limit = min(self.item_time_limit_s, deadline - time.monotonic())
        if limit <= 0 or self._pool is None:
            self._slots.release()
            return Verdict("timeout", "deadline passed while waiting for a free verifier worker")
        try:
            fut = self._pool.schedule(_work, (fn, response, reference), timeout=limit)
        except RuntimeError as exc:  # pool in error state / not running
            self._slots.release()
            raise _Broken(str(exc)) from exc
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._inflight.add(fut)
        # The slot is freed when pebble is done with the task, not when we stop waiting for it.
        fut.add_done_callback(lambda f: _call_soon(loop, self._finish, f, done))
        try:
            await asyncio.wait({done}, timeout=limit)
        finally:
            if not fut.done() and fut.running():
                fut.cancel()  # running past its deadline (or our caller went away): pebble kills the worker
                self._cancelled[fut] = time.monotonic()
            # not running yet = still in pebble's pipe: leave it, pebble's own timeout bounds it
        if fut in self._aborted:
            self._aborted.discard(fut)
            raise _Broken("the pool was replaced while the item was queued")
        if not fut.done():
            return Verdict("timeout", f"no verdict within {limit:.3g}s; the worker was stopped")
        return self._verdict(fut, limit)

    def _finish(self, fut: concurrent.futures.Future, done: asyncio.Future) -> None:
        """On the event loop, when pebble is done with `fut`: free its slot, wake its waiter."""
        self._inflight.discard(fut)
        self._slots.release()
        if not done.done():
            done.set_result(None)

    def _verdict(self, fut: concurrent.futures.Future, limit: float) -> Verdict:
        if fut.cancelled():
            return Verdict("timeout", f"no verdict within {limit:.3g}s; the worker was stopped")
        exc = fut.exception()
        if exc is None:
            return fut.result()
        if isinstance(exc, TimeoutError):
            return Verdict("timeout", f"no verdict within {limit:.3g}s; the worker was killed")
        if isinstance(exc, ProcessExpired):
            return error(
                f"verifier worker died (exit code {exc.exitcode}): out of memory "
                f"(limit {self._memory_mb} MiB) or killed"
            )
        if isinstance(exc, RuntimeError) or type(exc).__name__ == "BrokenProcessPool":
            raise _Broken(str(exc))
        return error(f"verifier failed: {type(exc).__name__}: {str(exc)[:300]}")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed (shutdown): nobody waits any more


def _stop_pool(pool: ProcessPool) -> None:
    pool.stop()
    pool.join(timeout=10)
