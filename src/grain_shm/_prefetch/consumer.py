"""The consumer's side: one run of worker processes, receiving item k from
the worker that made it, waiting (a worker's death shows at once on its
sentinel), stopping and draining.

The channel is a grain_shm.Queue per worker bounded to
`per_worker_buffer_size` messages, one message per item (channel.py). What
a message is, and how the consumer owns its arrays as they open, is
message.py's.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import time
import weakref
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from grain_shm._prefetch import channel as _channel
from grain_shm._prefetch import failure, message
from grain_shm._prefetch.maker import _Stats
from grain_shm._prefetch.worker import _work, pool_for_workers

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from grain_shm._prefetch.maker import Transform
    from grain_shm._prefetch.plan import _Plan
    from grain_shm.prefetch import RandomAccessSource

logger = logging.getLogger("grain_shm.prefetch")

_STOP_GRACE_S = 0.5  # after SIGTERM, before SIGKILL
_PROFILE_EVERY_S = 5.0


def _to_stderr_if_unconfigured() -> None:
    """Profiling was asked for: show it even where the program configured no
    logging (no handler anywhere up the logger's chain, and no level set on
    it), with a handler to stderr on this logger. A program that configured
    logging keeps what it chose (e.g. basicConfig's WARNING)."""
    if logger.hasHandlers() or logger.level != logging.NOTSET:
        return
    handler = logging.StreamHandler()  # sys.stderr, looked up as each record is written
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _Profile:
    """Per-worker figures from the stats the workers send, logged every few seconds."""

    def __init__(self, num_workers: int) -> None:
        _to_stderr_if_unconfigured()
        self.started = time.perf_counter()
        self.last_log = self.started
        self.stats: List[Optional[_Stats]] = [None] * num_workers
        self.waited_s = 0.0

    def update(self, worker: int, stats: _Stats) -> None:
        self.stats[worker] = stats
        if time.perf_counter() - self.last_log >= _PROFILE_EVERY_S:
            self.log()

    def log(self, final: bool = False) -> None:
        now = time.perf_counter()
        self.last_log = now
        when = "at the end" if final else "so far"
        for worker, stats in enumerate(self.stats):
            if stats is None:
                continue
            alive = max(stats.alive_s, 1e-9)
            logger.info(
                "prefetch worker %d %s: %.1f elements/s, %.1f MB/s, %.2f s in transform "
                "(%.0f%%), %.2f s reading the source, %.2f s blocked on a full buffer (%.0f%%)",
                worker, when, stats.elements / alive, stats.bytes / alive / 1e6,
                stats.transform_s, 100 * stats.transform_s / alive, stats.read_s,
                stats.blocked_s, 100 * stats.blocked_s / alive,
            )
        elapsed = max(now - self.started, 1e-9)
        logger.info(
            "prefetch consumer %s: %.2f s waiting for data (%.0f%% of %.2f s)",
            when, self.waited_s, 100 * self.waited_s / elapsed, elapsed,
        )


def _sweep_killed(procs: List[BaseProcess]) -> None:
    """The pool arenas of workers killed by a signal (here after the grace,
    or by the kernel's OOM killer): a killed process's exit hook never ran,
    so its arenas, up to its pool's bound, would stay until the session
    ends. The arrays this process took from them stay mapped. What a killed
    worker held outside the pool (fresh segments) still waits for the
    session's end: nothing names their owner."""
    killed = [proc.pid for proc in procs
              if proc.pid is not None and proc.exitcode is not None and proc.exitcode < 0]
    if not killed:
        return
    from grain_shm import admin, session  # only when a worker was killed

    for pid in killed:
        for name in admin.unlink_arenas_of(pid, session.SESSION):
            logger.debug("prefetch: unlinked arena %s of killed worker %d", name, pid)

class _Workers:
    """One run of worker processes: their channels, and how to stop them.

    They are the starting process's only: in a child forked from it (by
    os.fork, a multiprocessing fork, subprocess's preexec_fn) the workers are
    forgotten at once (`_forget_in_fork_children`), so that nothing there,
    our finalizer or multiprocessing's exit handler, signals, drains or joins
    the parent's workers."""

    def __init__(
        self,
        ctx: BaseContext,
        num_workers: int,
        first_item: int,
        plan: _Plan,
        payload: Union[bytes, Tuple[RandomAccessSource, Optional[Transform]]],
        buffer_size: int,
        profiling: bool,
        recycle: Optional[bool],
    ) -> None:
        self.first_item = first_item  # worker w makes first_item + w, + w + num_workers, ...
        self.pid = os.getpid()  # the process that started the workers, and may stop them
        self.forgotten = False  # in a forked child: the workers are the parent's
        self.procs: List[BaseProcess] = []
        self.channels: List[_channel.Channel] = []
        self.exited: set[int] = set()  # workers that ended well (exit code 0)
        self.profile = _Profile(num_workers) if profiling else None
        _running.add(self)
        pool = pool_for_workers(recycle)
        pipe = _channel.use_pipe()
        try:
            for worker in range(num_workers):
                channel = _channel.make_channel(ctx, buffer_size, pipe)
                self.channels.append(channel)
                proc = ctx.Process(  # type: ignore[attr-defined]
                    target=_work,
                    args=(worker, num_workers, first_item + worker, plan, payload,
                          channel.sender(), buffer_size, profiling, pool),
                    name=f"grain_shm-prefetch-{worker}",
                    daemon=True,
                )
                self.procs.append(proc)
                # Started with SIGTERM blocked (fork and spawn inherit the
                # mask; the worker unblocks it once its handler is in): a
                # stop that comes before would end the worker by SIGTERM's
                # default, with no exit hook, and a forked worker would keep
                # the block references it inherited until the session ends.
                unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
                channel.started()
        except BaseException:
            self.stop()
            raise

    def receive(self, item: int) -> Any:
        """Item `item`, owned by this process; raises what its worker raised."""
        worker = (item - self.first_item) % len(self.procs)
        try:
            data = self.channels[worker].take()
            if data is None:
                waiting = time.perf_counter()
                data = self._wait_for(worker, item)
                if self.profile is not None:
                    self.profile.waited_s += time.perf_counter() - waiting
        except EOFError:  # the old pipe channel: the worker's end closed, nothing sent
            raise self._death(worker, item) from None
        try:
            got, tree, stats = message.loads(data)  # its arrays are ours as they open
        except BaseException as error:  # a leaf that cannot be rebuilt here, Ctrl-C
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"(raised unpickling item {item} from prefetch worker {worker})")
            raise
        if got != item:  # not an assert: -O must not turn this into a wrong stream
            raise RuntimeError(
                f"prefetch worker {worker} sent item {got} where item {item} was due: its "
                f"order and the consumer's disagree (a bug in grain_shm; please report it)"
            )
        if isinstance(tree, failure.Failure):
            failure.raise_failure(tree)
        if self.profile is not None and stats is not None:
            self.profile.update(worker, stats)
        return tree

    def _wait_for(self, worker: int, item: int) -> bytes:
        """`worker`'s next message; a worker that died is an error now (on
        the Queue: within a wait slice)."""
        channel = self.channels[worker]
        while True:
            watched = {
                proc.sentinel: w for w, proc in enumerate(self.procs) if w not in self.exited
            }
            data, ready = channel.wait(list(watched))
            if data is not None:
                return data
            for sentinel in ready:
                w = watched[sentinel]
                self.procs[w].join(timeout=1.0)  # its sentinel closes just before it is reaped
                if self.procs[w].exitcode != 0:
                    raise self._death(w, item)
                self.exited.add(w)
                if w == worker:  # it ended well: what it sent is all there
                    data = channel.take()
                    if data is None:
                        raise self._death(w, item)
                    return data

    def _death(self, worker: int, item: int) -> RuntimeError:
        proc = self.procs[worker]
        proc.join(timeout=1.0)
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return RuntimeError(
            f"prefetch worker {worker} (pid {proc.pid}) {how}; the consumer was waiting "
            f"for item {item}"
        )

    def forget(self) -> None:
        """In a forked child: drop the parent's workers untouched, also from
        multiprocessing's list of this process's children (inherited by the
        fork), which its exit handler would terminate and join."""
        children = getattr(multiprocessing.process, "_children", None)
        if isinstance(children, set):
            children.difference_update(self.procs)
        self.procs, self.channels = [], []  # this copy's fds and handles close with them
        self.profile = None
        self.forgotten = True

    def stop(self) -> None:
        """Stop every worker (each unlinks what it holds), then unlink whatever
        they sent that the consumer never took. Within about _STOP_GRACE_S.
        Only in the process that started them."""
        if os.getpid() != self.pid:  # a child forked without at-fork hooks
            self.forget()
            return
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        live = [proc for proc in self.procs if proc.pid is not None]
        while True:
            self._drain()  # a worker blocked on a full buffer gets to finish its send
            live = [proc for proc in live if proc.exitcode is None]
            remaining = deadline - time.monotonic()
            if not live or remaining <= 0:
                break
            multiprocessing.connection.wait(  # a short wait: a ring has no fd to wait on
                [proc.sentinel for proc in live], timeout=min(remaining, 0.01)
            )
        for proc in live:
            proc.kill()  # its exit hook never runs: its arenas are swept below
        for proc in self.procs:
            if proc.pid is not None:
                proc.join()
        self._drain()
        _sweep_killed(self.procs)
        for channel in self.channels:
            channel.close()
        for proc in self.procs:
            proc.close()
        self.procs, self.channels = [], []
        if self.profile is not None:
            self.profile.log(final=True)
            self.profile = None

    def _drain(self) -> None:
        """Take and release every message waiting."""
        for worker, channel in enumerate(self.channels):
            for data in channel.drain():
                try:
                    message.loads(data)  # dropped at once: its arrays go
                except Exception:  # the arrays it had opened are gone already
                    logger.warning(
                        "prefetch: an item in flight from worker %d failed to unpickle "
                        "while the workers stopped; it was discarded", worker,
                        exc_info=True,
                    )


_running: weakref.WeakSet[_Workers] = weakref.WeakSet()  # this process's runs of workers


def _forget_in_fork_children() -> None:
    for workers in list(_running):
        workers.forget()


os.register_at_fork(after_in_child=_forget_in_fork_children)
