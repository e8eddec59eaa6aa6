"""`Supervisor`: the worker processes of one pool, from spawn to reaping.

It owns the slots (the ``size`` places of the pool, each with its current process), spawns
workers and waits for them to be ready, watches their exits, handles a loss (the core fails or
requeues what the worker had), replaces lost workers with crash-loop backoff, retires workers
gracefully, kills workers that stop sending heartbeats, exceed ``max_memory_per_worker`` or
do not let go of a cancelled request, and stops every process when the pool closes.

It knows the pool only through what it is given: the core, the loop, its options and a
callback for a worker that is gone. ``Pool`` routes the core's worker events to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from kameo import _native
from kameo._process import WORKER_CODE, ForkedProcess, WorkerProcess, exit_text
from kameo._zygote_client import FORK_TIMEOUT, Zygote, ZygoteError
from kameo.errors import PoolClosed, WorkerCrashed, WorkerStartupError
from kameo.events import Emitter, WorkerExited, WorkerStarted

__all__ = ["Slot", "Supervisor", "SupervisorOptions"]

log = logging.getLogger("kameo")

# Bounds on waiting for a worker to go once it has been told to (each step of shutdown()).
EXIT_WAIT = 1.0
KILL_WAIT = 5.0
# A lost worker gets this long to exit by itself before it is SIGKILLed (while running).
LOSS_EXIT_WAIT = 0.5
# Crash-loop protection: this many crashes of one slot within the window back off.
CRASH_WINDOW = 10.0
CRASH_FREE_RESTARTS = 3
MAX_BACKOFF = 5.0
# A zygote that died is started again after this long (doubling up to ZYGOTE_MAX_BACKOFF).
ZYGOTE_BACKOFF = 1.0
ZYGOTE_MAX_BACKOFF = 60.0
Channel = _native.Channel


@dataclass(frozen=True)
class SupervisorOptions:
    """What the supervisor needs of the pool's configuration."""

    name: str
    target: str
    python: str
    env: dict[str, str]
    cwd: str | None
    secret: bytes
    startup_timeout: float
    heartbeat_timeout: float
    max_memory: int | None
    cancel_grace: float
    #: Interpreter flags before ``-m kameo._worker`` (``-s`` for a PythonEnv's workers).
    python_flags: tuple[str, ...] = ()
    #: Variables of the parent's environment the workers do not get (before ``env``).
    unset_env: tuple[str, ...] = ()
    #: "exec" (each worker exec's the interpreter) or "zygote" (a template process forks
    #: them, see ``kameo._zygote``).
    start: str = "exec"
    #: What the zygote imports before it forks (after ``kameo._worker``).
    preload: tuple[str, ...] = ()
    #: What goes first on the workers' sys.path (WELCOME's); the zygote's too.
    sys_path: tuple[str, ...] = ()


class Slot:
    """One of the ``size`` places in the pool; its process changes when it is replaced."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: WorkerProcess | None = None
        self.restarts = 0
        self.crashes: deque[float] = deque(maxlen=CRASH_FREE_RESTARTS + 8)
        self.last_exit: str | None = None
        self.last_id = -1
        self.last_pid = 0
        self.failures = 0  # consecutive replacements that failed to start
        self.respawning = False
        #: Losses of its workers not yet accounted (Supervisor._finish_loss), and the READY
        #: of a replacement started meanwhile, held until they are: a replacement is never
        #: ready before its predecessor's exit is reported.
        self.losing = 0
        self.held_ready: list[tuple[WorkerProcess, Any]] = []


class Supervisor:
    """The processes of one pool. ``phase``: "starting" until :meth:`start` has every worker
    ready, then "running" (lost workers are replaced), then "closing" (from
    :meth:`begin_close`: nothing is replaced or retired any more)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core: Any,
        size: int,
        options: SupervisorOptions,
        *,
        on_worker_gone: Callable[[int, str], None],
        held: Callable[[int], bool] = lambda _wid: False,
        events: Emitter | None = None,
    ) -> None:
        self.loop = loop
        self.core = core
        self.options = options
        self.on_worker_gone = on_worker_gone
        #: Whether the pool holds Refs or open sessions on a worker: a retiring one stays
        #: until they are gone (:meth:`unheld`).
        self.held = held
        self.events = events if events is not None else Emitter(options.name, None)
        self.slots = [Slot(i) for i in range(size)]
        self.workers: dict[int, WorkerProcess] = {}
        self.crashes = 0  # workers that died while serving (PoolStats.crashes)
        self.phase = "starting"
        self._next_worker_id = 0
        self._background: set[asyncio.Task[Any]] = set()
        # Set by begin_close(): what requests fail with when the pool stops their worker.
        self._closed_running: PoolClosed | None = None
        self._closed_waiting: PoolClosed | None = None
        self._stopping = False  # shutdown() has started telling workers to go
        #: The zygote that forks workers (start="zygote" and its preload worked), else None.
        self.zygote: Zygote | None = None
        #: Why the workers are exec'd although start="zygote" (also logged).
        self.zygote_fallback: str | None = None
        self._zygote_restarts = 0

    # ----------------------------------------------------------------- start

    async def start(self) -> None:
        """Start a worker in every slot and wait until all are ready (WorkerStartupError
        within ``startup_timeout`` otherwise), then supervise them."""
        if self.options.start == "zygote":
            await self._start_zygote()
        workers = await self._spawn_all(self.slots)
        await self._await_ready(workers)
        self.phase = "running"
        self._background_task(self._supervise())

    def _worker_env(self) -> dict[str, str]:
        opts = self.options
        env = {k: v for k, v in os.environ.items() if k not in opts.unset_env}
        env.update(opts.env)
        return env

    async def _start_zygote(self) -> bool:
        """Start the zygote; on failure, log why (the workers are exec'd). True if it runs."""
        opts = self.options
        zygote = Zygote(
            self.loop,
            pool=opts.name,
            python=[opts.python, *opts.python_flags],
            env=self._worker_env(),
            cwd=opts.cwd,
            preload=list(opts.preload),
            sys_path=list(opts.sys_path),
            size=len(self.slots),
        )
        try:
            why = await zygote.start(opts.startup_timeout, opts.target)
        except WorkerStartupError as exc:
            if self.phase == "starting":
                raise  # the pool's start fails (a preload that hangs)
            why = str(exc)  # a restart: the workers are exec'd
        if why is not None:
            self.zygote_fallback = why
            log.warning(
                "pool %s: start='zygote' falls back to exec: the zygote: %s", opts.name, why
            )
            return False
        self.zygote, self.zygote_fallback = zygote, None
        self._background_task(self._restart_zygote_when_it_dies(zygote))
        return True

    async def _restart_zygote_when_it_dies(self, zygote: Zygote) -> None:
        await asyncio.shield(zygote.died)
        if self.zygote is zygote:
            self.zygote = None
        while self.phase != "closing":
            self._zygote_restarts += 1
            delay = min(ZYGOTE_BACKOFF * 2 ** (self._zygote_restarts - 1), ZYGOTE_MAX_BACKOFF)
            await asyncio.sleep(delay)
            if self.phase == "closing":
                return
            if await self._start_zygote():
                return

    def _spawn(self, slot: Slot) -> WorkerProcess:
        """A worker started in ``slot`` now: forked by the zygote (waiting for its answer
        here, bounded), else exec'd."""
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        zygote = self.zygote
        if zygote is not None and zygote.ready:
            try:
                forked, progress_fd = zygote.fork(worker_id, slot.index, self.options.secret)
            except ZygoteError as exc:
                self._fork_failed(exc, worker_id)
            else:
                self._add(slot, forked, progress_fd)
                return forked
        return self._exec(slot, worker_id)

    async def _spawn_all(self, slots: list[Slot]) -> list[WorkerProcess]:
        """A worker started in each slot. With a zygote, every fork request goes at once,
        and each worker is taken in as its answer comes (its handshake can run while the
        zygote forks the next); a worker it does not fork is exec'd."""
        zygote = self.zygote
        if zygote is None or not zygote.ready:
            return [self._spawn(slot) for slot in slots]
        ids = list(range(self._next_worker_id, self._next_worker_id + len(slots)))
        self._next_worker_id += len(slots)
        pairs = list(zip(slots, ids, strict=True))
        forks = zygote.forks([(wid, slot.index) for slot, wid in pairs], self.options.secret)
        deadline = self.loop.time() + FORK_TIMEOUT
        workers: list[WorkerProcess] = []
        for (slot, wid), forking in zip(pairs, forks, strict=True):
            try:
                forked, progress_fd = await zygote.wait_forked(forking, deadline)
            except ZygoteError as exc:
                self._fork_failed(exc, wid)
                workers.append(self._exec(slot, wid))
            else:
                self._add(slot, forked, progress_fd)
                workers.append(forked)
        return workers

    def _fork_failed(self, exc: ZygoteError, worker_id: int) -> None:
        log.warning("pool %s: %s; exec'ing worker %d instead", self.options.name, exc, worker_id)

    def _exec(self, slot: Slot, worker_id: int) -> WorkerProcess:
        opts = self.options
        env = self._worker_env()
        env["KAMEO_WORKER_ID"] = str(worker_id)
        env["KAMEO_PARENT_PID"] = str(os.getpid())
        # The pool's name and the worker's id after the module: `ps -f` shows them (the worker
        # takes them out of its sys.argv, and names its process after them).
        argv = [opts.python, *opts.python_flags, "-c", WORKER_CODE, opts.name, f"w{worker_id}"]
        try:
            pid, sock_fd, stderr_fd, progress_fd = _native.spawn_worker(
                argv, list(env.items()), opts.cwd, opts.secret
            )
        except OSError as exc:
            raise WorkerStartupError(
                f"cannot start a worker for {opts.target!r} with python {opts.python!r}: {exc}"
            ) from exc
        w = WorkerProcess(self.loop, worker_id, slot.index, pid, sock_fd, stderr_fd, opts.name)
        self._add(slot, w, progress_fd)
        return w

    def _add(self, slot: Slot, w: WorkerProcess, progress_fd: int) -> None:
        self.workers[w.id] = w
        slot.worker = w
        self.core.add_worker(w.id, w.pid, w.sock_fd, progress_fd)
        self.loop.add_reader(w.sock_fd, self.core.on_readable, w.id)
        w.watch(self._on_exit)

    async def _await_ready(self, workers: list[WorkerProcess]) -> None:
        timeout = self.options.startup_timeout
        done, pending = await asyncio.wait([w.ready for w in workers], timeout=timeout)
        failures = [f.exception() for f in done if f.exception() is not None]
        if failures:
            first = failures[0]
            assert first is not None
            if len(failures) > 1:
                raise WorkerStartupError(f"{first} ({len(failures)} workers failed)") from None
            raise first
        if pending:
            late = [w for w in workers if not w.ready.done()]
            names = ", ".join(w.describe() for w in late)
            tail = late[0].tail()
            for w in late:
                w.kill(signal.SIGKILL)
            raise WorkerStartupError(
                f"{names} did not finish starting {self.options.target!r} within "
                f"startup_timeout={timeout}s" + (f"; last stderr lines:\n{tail}" if tail else "")
            )

    # ----------------------------------------------------------------- worker events

    def ready(self, w: WorkerProcess, payload: Any) -> None:
        """READY: the worker loaded its target; queued requests may go to it."""
        slot = self.slots[w.slot]
        if slot.losing and not w.lost:
            slot.held_ready.append((w, payload))  # until its predecessor's loss is accounted
            return
        if not w.ready.done():
            w.ready.set_result(payload)
            if self.events.active:
                startup = time.monotonic() - w.started_at
                self.events.emit(WorkerStarted(self.options.name, w.id, w.pid, startup))
        self.slots[w.slot].failures = 0
        self.core.dispatch_queued()

    def startup_failed(self, w: WorkerProcess, info: Any) -> None:
        """STARTUP_FAILED: the worker could not import or initialise its target."""
        info = info if isinstance(info, dict) else {}
        message = (
            f"{w.describe()} could not {info.get('stage', 'load target')} "
            f"{info.get('what', repr(self.options.target))}: "
            f"{info.get('type', '?')}: {info.get('message', '')}"
        )
        tb = info.get("traceback")
        if tb:
            message += f"\n\nWorker traceback:\n{tb.rstrip()}"
        self._fail_startup(w, WorkerStartupError(message))

    def rejected(self, w: WorkerProcess, payload: Any) -> None:
        """The worker's handshake was refused."""
        self._fail_startup(w, WorkerStartupError(f"{w.describe()} was refused: {payload}"))
        self.lose(w, f"handshake refused: {payload}")

    def drained(self, w: WorkerProcess) -> None:
        """The worker has nothing in flight: a retiring one may go now."""
        if w.retiring and not self.held(w.id):
            self.core.send_control(w.id, Channel.SHUTDOWN)

    def unheld(self, wid: int) -> None:
        """The pool's last Ref or session on worker ``wid`` went: a retiring worker may go once
        idle (the core reports it drained again)."""
        w = self.workers.get(wid)
        if w is not None and w.retiring and not w.lost:
            self.core.retire(wid)

    def _fail_startup(self, w: WorkerProcess, exc: BaseException) -> None:
        if not w.ready.done():
            w.ready.set_exception(exc)
            w.ready.exception()  # retrieved: the waiter may be gone already

    # ----------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        """Heartbeats and memory limits, checked a few times per heartbeat timeout."""
        heartbeat_timeout = self.options.heartbeat_timeout
        max_memory = self.options.max_memory
        tick = min(heartbeat_timeout / 4, 0.5)
        while self.phase == "running":
            await asyncio.sleep(tick)
            for wid in self.core.silent_workers(heartbeat_timeout):
                w = self.workers.get(wid)
                if w is not None and not w.lost:
                    log.error(
                        "%s sent nothing for heartbeat_timeout=%ss; killing it",
                        w.describe(),
                        heartbeat_timeout,
                    )
                    w.hung = w.killed = True
                    w.kill(signal.SIGKILL)
            if max_memory is not None:
                for w in list(self.workers.values()):
                    if not w.lost and not w.retiring and w.ready.done():
                        rss = _rss(w.pid)
                        if rss is not None and rss > max_memory:
                            why = f"max_memory_per_worker ({rss} > {max_memory} bytes)"
                            self.retire(w, why)  # first: the core may report it drained at once
                            self.core.retire(w.id)

    def retire(self, w: WorkerProcess, why: str) -> None:
        """Replace ``w`` gracefully: its successor starts now, it leaves once idle."""
        if w.retiring or w.lost or self.phase != "running":
            return
        log.info("%s retires: %s", w.describe(), why)
        w.retiring = True
        slot = self.slots[w.slot]
        slot.last_exit = f"retired: {why}"
        self._schedule_replace(slot, 0.0)

    def enforce_cancel(self, wid: int, rid: int) -> None:
        """``cancel_grace`` after request ``rid`` was cancelled on worker ``wid``: if it still
        runs there (a sync handler cannot be interrupted), kill the worker (and, unless the
        pool is closing, replace it)."""
        if self.core.running_on(rid) != wid:
            return
        w = self.workers.get(wid)
        if w is None or w.lost:
            return
        then = "replacing it" if self.phase == "running" else "killing it (the pool is closing)"
        log.warning(
            "%s did not stop a cancelled request within cancel_grace=%ss; %s",
            w.describe(),
            self.options.cancel_grace,
            then,
        )
        w.killed = True
        w.kill(signal.SIGKILL)

    # ----------------------------------------------------------------- loss

    def _on_exit(self, w: WorkerProcess) -> None:
        """The pidfd is readable: the process has exited. Reap it."""
        w.reap()
        if not w.lost:
            # What it wrote before it exited (answers, its last log records) is read first:
            # the socket and the pidfd may be ready in the same loop iteration, the pidfd first.
            try:
                self.core.on_readable(w.id)
            except Exception as exc:  # as the loop does with an error in a reader callback
                self.loop.call_exception_handler(
                    {
                        "message": "kameo: error while reading a worker's last frames",
                        "exception": exc,
                    }
                )
        if not w.lost:
            self.lose(w, "exited")

    def lose(self, w: WorkerProcess, reason: str, *, killed: bool = False) -> None:
        """The worker is gone or unusable: reap it, fail what it had started, requeue the rest,
        and start a replacement. ``killed``: the pool drops it (it broke the protocol)."""
        if w.lost:
            return
        w.lost = True
        w.killed = w.killed or killed
        w.exit_reason = _exit_reason(w)
        self.loop.remove_reader(w.sock_fd)
        self.slots[w.slot].losing += 1
        self._replace_at_once(w)
        self._background_task(self._finish_loss(w, reason))

    def _replace_at_once(self, w: WorkerProcess) -> None:
        """A ready worker lost while the pool runs: its replacement starts now, not once its
        exit status is in (a forked worker's comes from its zygote), unless its slot is in a
        crash loop (then _finish_loss starts it after the back-off, as for any other)."""
        slot = self.slots[w.slot]
        ready = w.ready.done() and w.ready.exception() is None
        if self.phase != "running" or w.retiring or slot.respawning or not ready:
            return
        completed = next((row[4] for row in self.core.worker_stats() if row[0] == w.id), 0)
        if not completed:
            slot.crashes.append(time.monotonic())
            if self._backoff_delay(slot):
                slot.crashes.pop()  # counted, with the back-off, in _finish_loss
                return
        w.replaced = True
        self._schedule_replace(slot, 0.0)

    async def _finish_loss(self, w: WorkerProcess, reason: str) -> None:
        slot = self.slots[w.slot]
        try:
            await self._account_loss(w, reason)
        finally:
            slot.losing -= 1
            if not slot.losing:
                held, slot.held_ready = slot.held_ready, []
                for successor, payload in held:
                    self.ready(successor, payload)

    async def _account_loss(self, w: WorkerProcess, reason: str) -> None:
        opts = self.options
        if not await w.wait_exit(LOSS_EXIT_WAIT if self.phase != "closing" else EXIT_WAIT):
            w.kill(signal.SIGKILL)
            await w.wait_exit(KILL_WAIT)
        w.read_stderr()  # collect the last lines
        self._report_exit(w)
        if w.exited.done() and w.exited.result() >= 0:
            what, exitcode, sig = exit_text(w.exited.result())
            if reason not in ("exited", "closed its connection"):
                what = f"was dropped ({reason}) and {what}"
        else:
            what, exitcode, sig = reason, None, None
        if isinstance(w, ForkedProcess) and w.orphaned:
            what = f"died with it: {w.orphaned}"  # its status went with its zygote
        if w.hung:
            what = f"stopped sending heartbeats for {opts.heartbeat_timeout}s and was killed"
        tail = w.tail()
        suffix = f"; last stderr lines:\n{tail}" if tail else ""
        self._fail_startup(
            w,
            WorkerStartupError(
                f"{w.describe()} {what} before it was ready (target {opts.target!r}){suffix}"
            ),
        )
        exc: BaseException
        if w.stopping and self._closed_running is not None:
            exc = self._closed_running  # the pool stopped it: nothing crashed
        else:
            exc = WorkerCrashed(
                f"{w.describe()} {what} while running the request{suffix}",
                worker_id=w.id,
                pid=w.pid,
                exitcode=exitcode,
                signal=sig,
                stderr_tail=tail,
            )
        core = self.core
        completed = next((row[4] for row in core.worker_stats() if row[0] == w.id), 0)
        core.remove_worker(w.id, exc)
        if self._stopping and self._closed_waiting is not None:
            core.fail_queued(self._closed_waiting)  # what it had not started: no one will
        self.on_worker_gone(w.id, f"{w.describe()} {what}")
        w.close_stderr()
        self.workers.pop(w.id, None)
        slot = self.slots[w.slot]
        if slot.worker is w:
            slot.worker = None
        slot.last_id, slot.last_pid = w.id, w.pid
        if w.retiring:
            return  # its successor is already running
        running = self.phase == "running"
        if running and w.ready.done() and not w.ready.exception():
            self.crashes += 1
            slot.restarts += 1
            slot.last_exit = what
            if not completed and not w.replaced:
                # A worker that dies before finishing a single request is what a crash loop
                # looks like (a broken handler or environment); one killed after doing work
                # (OOM, an operator, chaos) is replaced at once.
                slot.crashes.append(time.monotonic())
            log.warning("%s %s; starting a replacement", w.describe(), what)
        if running and not slot.respawning and not w.replaced:
            self._schedule_replace(slot, self._backoff(slot))
        if not any(not x.lost for x in self.workers.values()) and not self._respawn_pending():
            core.fail_queued(exc)

    def _respawn_pending(self) -> bool:
        return self.phase == "running" and any(s.respawning for s in self.slots)

    # ----------------------------------------------------------------- replacement

    def _backoff_delay(self, slot: Slot) -> float:
        """How long the slot's next start waits (0 outside a crash loop)."""
        now = time.monotonic()
        recent = sum(1 for t in slot.crashes if now - t < CRASH_WINDOW)
        delay = 0.0
        if recent > CRASH_FREE_RESTARTS:
            delay = min(0.1 * 2 ** (recent - CRASH_FREE_RESTARTS), MAX_BACKOFF)
        if slot.failures:
            delay = max(delay, min(0.1 * 2**slot.failures, MAX_BACKOFF))
        return delay

    def _backoff(self, slot: Slot) -> float:
        delay = self._backoff_delay(slot)
        if delay:
            now = time.monotonic()
            recent = sum(1 for t in slot.crashes if now - t < CRASH_WINDOW)
            slot.last_exit = (
                f"{slot.last_exit or 'crashed'}; crash loop: next start in {delay:.1f}s"
            )
            log.error(
                "worker slot %d crashed %d times in %ss; backing off %.1fs",
                slot.index,
                recent,
                CRASH_WINDOW,
                delay,
            )
        return delay

    def _schedule_replace(self, slot: Slot, delay: float) -> None:
        """Start a replacement for ``slot`` after ``delay``; without one, its process starts
        now, so that from now on the pool has a worker to bind a session to (its calls wait
        for it to be ready). Until it is ready or gives up, the slot counts as respawning (so
        queued requests wait for it rather than fail)."""
        slot.respawning = True
        spawned: WorkerProcess | WorkerStartupError | None = None
        if not delay and self.phase == "running":
            try:
                spawned = self._spawn(slot)
            except WorkerStartupError as exc:
                spawned = exc  # reported by _replace, as a failure to start there would be
        self._background_task(self._replace(slot, delay, spawned))

    async def _replace(
        self, slot: Slot, delay: float, spawned: WorkerProcess | WorkerStartupError | None
    ) -> None:
        again = False
        try:
            if delay:
                await asyncio.sleep(delay)
            if self.phase != "running":
                return
            try:
                if isinstance(spawned, WorkerStartupError):
                    raise spawned
                w = spawned if spawned is not None else self._spawn(slot)
                await self._await_ready([w])
            except WorkerStartupError as exc:
                slot.failures += 1
                slot.last_exit = f"replacement failed to start: {exc}"
                log.error("could not start a replacement worker: %s", exc)
                if not any(not x.lost and x.ready.done() for x in self.workers.values()):
                    self.core.fail_queued(exc)
                if self.phase == "running":
                    again = True
                    self._schedule_replace(slot, self._backoff(slot))
        finally:
            if not again:
                slot.respawning = False

    # ----------------------------------------------------------------- shutdown

    def begin_close(self, running: PoolClosed, waiting: PoolClosed) -> None:
        """The pool is closing: replace and retire nothing any more, stop supervising.
        ``running``: what requests on a worker the pool stops fail with; ``waiting``: what
        requests that then wait for a worker fail with."""
        self.phase = "closing"
        self._closed_running, self._closed_waiting = running, waiting
        for task in list(self._background):
            task.cancel()

    async def shutdown(self) -> None:
        """Stop every worker (SHUTDOWN, then SIGTERM, then SIGKILL, each step bounded), reap
        it, close its descriptors and fail what it still had. After :meth:`begin_close`."""
        closed, waiting = self._closed_running, self._closed_waiting
        assert closed is not None and waiting is not None
        self._stopping = True
        loop, core = self.loop, self.core
        workers = list(self.workers.values())
        for w in workers:
            w.stopping = True
            if w.lost:
                continue
            if w.ready.done():
                core.send_control(w.id, Channel.SHUTDOWN)
            else:
                w.kill(signal.SIGKILL)  # still starting: nothing to finish
        for step, sig in ((EXIT_WAIT, signal.SIGTERM), (EXIT_WAIT, signal.SIGKILL)):
            alive = [w for w in workers if not w.exited.done()]
            if not alive:
                break
            await asyncio.wait([loop.create_task(w.wait_exit(step)) for w in alive])
            for w in alive:
                if not w.exited.done():
                    w.kill(sig)
        for w in workers:
            if not w.exited.done() and not await w.wait_exit(KILL_WAIT):
                log.error("%s did not exit after SIGKILL", w.describe())
        for w in workers:
            if not w.lost:
                w.lost = True
                loop.remove_reader(w.sock_fd)
            w.read_stderr()
            self._report_exit(w)
            self._fail_startup(w, closed)
            w.close_stderr()
            core.remove_worker(w.id, closed)
            self.workers.pop(w.id, None)
        core.fail_queued(waiting)
        if self.zygote is not None:
            await self.zygote.close(EXIT_WAIT)
            self.zygote = None
        if self._background:
            await asyncio.wait(list(self._background), timeout=KILL_WAIT)

    def _report_exit(self, w: WorkerProcess) -> None:
        """A WorkerExited event for ``w``, once, when someone listens."""
        if w.exit_reported or not self.events.active:
            return
        w.exit_reported = True
        exitcode = sig = None
        if w.exited.done() and w.exited.result() >= 0:
            _, exitcode, sig = exit_text(w.exited.result())
        # Not lost before shutdown(): the pool stopped it, unless it had failed to start.
        reason = w.exit_reason or ("startup_failed" if _failed_start(w) else "closed")
        self.events.emit(WorkerExited(self.options.name, w.id, w.pid, reason, exitcode, sig))

    def kill_now(self) -> None:
        """At interpreter exit: SIGKILL and reap every worker."""
        for w in list(self.workers.values()):
            w.kill_now()
        if self.zygote is not None:
            self.zygote.kill_now()

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _exit_reason(w: WorkerProcess) -> str:
    """``WorkerExited.reason`` of a worker as it is lost (see ``kameo.events.EXIT_REASONS``)."""
    if _failed_start(w):
        return "startup_failed"
    if w.stopping:
        return "closed"
    if not w.ready.done():
        return "startup_failed"  # died while it started
    if w.retiring:
        return "retired"
    if w.killed:
        return "killed"
    return "crashed"


def _failed_start(w: WorkerProcess) -> bool:
    """The worker could not start (its ready future holds a WorkerStartupError)."""
    ready = w.ready
    return (
        ready.done() and not ready.cancelled() and isinstance(ready.exception(), WorkerStartupError)
    )


def _rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
