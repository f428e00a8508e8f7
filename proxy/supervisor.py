"""The supervisor of `[server] workers = N > 1`: one instance, N worker processes.

The supervisor binds every listener once, before any worker starts, so that "address in use"
is reported once and ports 80/443 can be bound before privileges are dropped. It binds one
SO_REUSEPORT socket per address and port *for each worker* (as nginx's `reuseport` does):
the kernel hashes new connections evenly over the workers' sockets, where a single shared
socket lets whichever worker wakes first take most of them. It keeps its own copy of every
socket, so a dying worker's backlog waits for its successor instead of being reset.

Workers are `python -m proxy run` processes (a fresh interpreter, nothing inherited but the
listed file descriptors; see worker.py), in their own session so that a terminal's Ctrl-C
reaches the supervisor only. A worker that exits unasked is restarted after a backoff that
doubles up to 30 s and starts over once a worker has run for a while. SIGHUP, SIGUSR1 and
SIGTERM/SIGINT are passed on to every worker; on SIGTERM the supervisor closes its listener
copies, waits for the workers to drain (each within `grace_period`) and exits 0.

The admin port is the supervisor's: `/metrics` adds up the workers' metrics, `/readyz` is
200 only when every worker answers that it is ready. The supervisor also creates the
session-ticket keys, rotates them, and hands them to the workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from proxy.config import Config, LimitsConfig
from proxy.config_load import ConfigError, load_config
from proxy.handlers.admin import AdminHandler, InstanceView
from proxy.handlers.observed import Observed
from proxy.instance_status import instance_status
from proxy.metrics import merge_expositions
from proxy.netio import close_socket
from proxy.server import Listeners, bind_public, serve_admin
from proxy.tls.policy import new_ticket_key
from proxy.traffic import merge_snapshots
from proxy.worker import WORKER_ENV, Channel, Message, WorkerSpec

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.5  # seconds before restarting a worker that died
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # a worker that ran this long was healthy: the next restart is quick
STATUS_TIMEOUT = 2.0  # a worker that cannot answer within this is not ready
# Session tickets live 2 hours (OpenSSL's default); rotating as often and keeping the
# previous key lets every ticket still valid resume, whichever worker it lands on.
TICKET_KEY_ROTATION = 7200.0
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@dataclass
class _Worker:
    index: int
    listeners: Listeners  # the supervisor's copies; the worker inherits them
    process: trio.Process | None = None
    channel: Channel | None = None
    asking: trio.Lock = field(default_factory=trio.Lock)  # one status question at a time


class Supervisor(InstanceView):
    def __init__(self, config: Config) -> None:
        self.config = config
        self._workers: list[_Worker] = []
        try:
            for index in range(1, config.server.workers + 1):
                self._workers.append(_Worker(index, bind_public(config.listen)))
        except BaseException:
            self._close_listeners()
            raise
        self._ticket_keys = [new_ticket_key()]
        self._started = time.time()
        self._stop = trio.Event()
        self._question = itertools.count()
        self._registry = CollectorRegistry()
        Gauge(
            "port443_workers",
            "Worker processes running now.",
            registry=self._registry,
        ).set_function(lambda: sum(w.process is not None for w in self._workers))
        self._restarts = Counter(
            "port443_worker_restarts",
            "Worker processes that exited unasked and were started again.",
            registry=self._registry,
        )
        # The workers count the instance's admin requests; the supervisor only answers them.
        self._admin_handler = Observed(AdminHandler(self, config.admin.token), "admin", ())

    async def run(self) -> None:
        """Run the workers until SIGTERM/SIGINT, then until they have drained."""
        for sock, kind in self._workers[0].listeners:
            host, port = sock.getsockname()[:2]
            log.info("listening for %s on %s port %d (%d workers)", kind, host, port, len(self))
        async with trio.open_nursery() as services:
            if self.config.admin.enabled:
                await services.start(
                    serve_admin, self.config.admin, self._admin_handler, self._limits
                )
            services.start_soon(self._handle_signals)
            services.start_soon(self._rotate_ticket_keys)
            async with trio.open_nursery() as workers:
                for worker in self._workers:
                    workers.start_soon(self._keep_running, worker)
            services.cancel_scope.cancel()
        log.info("all workers stopped")

    def __len__(self) -> int:
        return len(self._workers)

    def _limits(self) -> LimitsConfig:
        return self.config.limits

    # -- processes ------------------------------------------------------------------------

    async def _keep_running(self, worker: _Worker) -> None:
        backoff = FIRST_BACKOFF
        while not self._stop.is_set():
            started = trio.current_time()
            process = await self._spawn(worker)
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # the supervisor itself is failing
                    process.kill()
                worker.process = None
                if worker.channel is not None:
                    worker.channel.close()
                    worker.channel = None
            if self._stop.is_set():
                log.info("worker %d (pid %d) exited with %s", worker.index, process.pid, code)
                return
            if trio.current_time() - started >= STABLE_AFTER:
                backoff = FIRST_BACKOFF
            log.error(
                "worker %d (pid %d) exited with %s; restarting it in %gs",
                worker.index,
                process.pid,
                _exit_status(code),
                backoff,
            )
            self._restarts.inc()
            with trio.move_on_after(backoff):
                await self._stop.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _spawn(self, worker: _Worker) -> trio.Process:
        ours, theirs = socket.socketpair()
        try:
            spec = WorkerSpec(
                index=worker.index,
                listeners=tuple((sock.fileno(), kind) for sock, kind in worker.listeners),
                control=theirs.fileno(),
                ticket_keys=tuple(self._ticket_keys),
            )
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config.path)],
                pass_fds=(*(fd for fd, _ in spec.listeners), spec.control),
                env={**os.environ, WORKER_ENV: spec.to_env()},
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.process = process
        worker.channel = Channel(trio.socket.from_stdlib_socket(ours))
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        return process

    # -- signals ------------------------------------------------------------------------

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP and not self._reload():
                    continue
                if signum in (signal.SIGTERM, signal.SIGINT) and not self._stop.is_set():
                    log.info("received %s: shutting down %d workers", name, len(self))
                    self._stop.set()
                    self._close_listeners()  # the workers' copies close once they drain
                self._signal_workers(signum)

    def _reload(self) -> bool:
        """Validate the configuration once for all workers; True if they should reload."""
        try:
            config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, the workers keep the running configuration:\n%s", exc)
            return False
        for section in ("server", "listen", "admin"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("reload: [%s] changes take effect only after a restart", section)
        self.config = config
        log.info("reloading %d workers", len(self))
        return True

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    def _close_listeners(self) -> None:
        for worker in self._workers:
            for sock, _ in worker.listeners:
                close_socket(sock)

    # -- ticket keys --------------------------------------------------------------------

    async def _rotate_ticket_keys(self) -> None:
        while True:
            await trio.sleep(TICKET_KEY_ROTATION)
            self._ticket_keys = [new_ticket_key(), self._ticket_keys[0]]
            keys = [key.hex() for key in self._ticket_keys]
            for worker in self._workers:
                if worker.channel is not None:
                    try:
                        await worker.channel.send({"op": "ticket_keys", "keys": keys})
                    except OSError as exc:  # it is dying; its successor gets the new keys
                        log.info("worker %d missed the new ticket keys: %s", worker.index, exc)
            log.info("rotated the session ticket keys")

    # -- the admin port's view of the instance -------------------------------------------

    async def exposition(self) -> bytes:
        return self._merged_exposition(await self._ask_all())

    async def unready_reason(self) -> str | None:
        return self._unready_reason(await self._ask_all())

    async def status(self) -> dict[str, Any]:
        answers = await self._ask_all()
        workers = []
        for worker in self._workers:
            answer = answers[worker.index]
            reason = "not running or not answering" if answer is None else answer["unready"]
            pid = None if worker.process is None else worker.process.pid
            workers.append({"index": worker.index, "pid": pid, "ready": reason is None,
                            "reason": reason})  # fmt: skip
        return instance_status(
            self.config,
            started=self._started,
            exposition=self._merged_exposition(answers),
            traffic=merge_snapshots(a["traffic"] for a in answers.values() if a is not None),
            workers=workers,
            unready=self._unready_reason(answers),
        )

    def _merged_exposition(self, answers: dict[int, Message | None]) -> bytes:
        texts = [answer["metrics"] for answer in answers.values() if answer is not None]
        return merge_expositions([*texts, generate_latest(self._registry).decode()])

    def _unready_reason(self, answers: dict[int, Message | None]) -> str | None:
        if self._stop.is_set():
            return "shutting down"
        for worker in self._workers:
            answer = answers[worker.index]
            if answer is None:
                return f"worker {worker.index} is not running or not answering"
            if answer["unready"] is not None:
                return f"worker {worker.index}: {answer['unready']}"
        return None

    async def _ask_all(self) -> dict[int, Message | None]:
        answers: dict[int, Message | None] = {}

        async def ask(worker: _Worker) -> None:
            answers[worker.index] = await self._ask(worker)

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(ask, worker)
        return answers

    async def _ask(self, worker: _Worker) -> Message | None:
        """A worker's status, or None if it is down or does not answer in time. Questions
        are numbered so that an answer arriving after its timeout is skipped later."""
        async with worker.asking:
            channel = worker.channel
            if channel is None:
                return None
            question = next(self._question)
            with trio.move_on_after(STATUS_TIMEOUT):
                try:
                    await channel.send({"op": "status", "id": question})
                    while (answer := await channel.receive()) is not None:
                        if answer.get("id") == question:
                            return answer
                except (OSError, ValueError) as exc:
                    log.info("worker %d did not answer: %s", worker.index, exc)
            return None


def _exit_status(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
