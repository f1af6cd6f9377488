"""The supervisor: starts the workers, restarts the ones that die, drains.

It runs no event loop of its own. Signal handlers only record the signal
(and wake the loop through a pipe); the loop acts on it: the first SIGTERM
or SIGINT sends SIGTERM to every worker (each drains: close 1001 to its
peers) and the supervisor exits 0 once all have exited; a second signal
kills the workers and exits at once.

A worker that dies is restarted with the same index, so topic ownership
does not move and only the peers of that worker's topics were lost. A
worker that dies within ``CRASH_WINDOW`` seconds of its start
``CRASH_LIMIT`` times in a row, or that reports a boot error (exit code 3,
e.g. the port is taken), stops the server with an error instead.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import multiprocessing.reduction
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from signaling_sharded._native import MetricsTable
from signaling_sharded.server import auth, webhooks
from signaling_sharded.server.config import Config
from signaling_sharded.server.logs import log
from signaling_sharded.server.worker import EXIT_BOOT_ERROR, PortInUse, bound_socket, lock_port, run

CRASH_WINDOW = 5.0
CRASH_LIMIT = 3
#: Seconds past the workers' drain timeout before they are killed.
KILL_GRACE = 2.0
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


class InheritedFd:
    """A descriptor that a worker started with the ``spawn`` method
    inherits: pickled for it, the descriptor is passed to the new process
    (as multiprocessing passes sockets) and arrives as an ``int``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[object, tuple[object]]:
        return _inherited, (multiprocessing.reduction.DupFd(self.fd),)


def _inherited(dup: object) -> int:
    fd: int = dup.detach()  # type: ignore[attr-defined]
    return fd


def metrics_memory(workers: int) -> tuple[int, MetricsTable]:
    """A zeroed, anonymous file for the metrics table, and the table."""
    fd = os.memfd_create("signaling-sharded-metrics", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MetricsTable.size(workers))
        return fd, MetricsTable(fd, workers)
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Slot:
    """One worker index and the process currently filling it."""

    index: int
    process: multiprocessing.process.BaseProcess
    started: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0


def check_migrate_req() -> None:
    try:
        enabled = MIGRATE_REQ.read_text().strip() != "0"
    except OSError:
        return  # not Linux, or a kernel older than 5.14
    if not enabled:
        log(
            logging.WARNING,
            "net.ipv4.tcp_migrate_req is 0: connections queued on a worker that dies are "
            "reset instead of moving to another worker; set it to 1 (sysctl -w "
            "net.ipv4.tcp_migrate_req=1) to keep them",
        )


class Supervisor:
    def __init__(self, config: Config) -> None:
        if config.resume_secret is None:
            # One key for every worker of this run: a restarted worker
            # still accepts the tokens the others gave out.
            config = replace(config, resume_secret=secrets.token_hex(32))
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        #: Names this server's hand-off sockets; set once the port is known.
        self.group = ""
        #: The port lock and the supervisor's own bound (not listening)
        #: socket on the port, held until the server exits.
        self.port_lock: socket.socket | None = None
        self.reservation: socket.socket | None = None
        self.slots: dict[int, Slot] = {}
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.exit_code = 0
        self.metrics_fd, self.metrics = metrics_memory(config.workers)

    def take_port(self) -> bool:
        """Lock the port for this server and bind it (for port 0, pick one
        first, which every worker then shares); False with the reason
        logged if another process has it."""
        config = self.config
        try:
            if config.port:
                self.port_lock = lock_port(config.port)
            self.reservation = bound_socket(config.host, config.port)
            if not config.port:
                self.config = replace(config, port=self.reservation.getsockname()[1])
                self.port_lock = lock_port(self.config.port)
        except (PortInUse, OSError) as exc:
            log(logging.ERROR, "cannot listen", host=config.host, port=config.port, error=str(exc))
            self.release_port()
            return False
        self.group = f"{os.getpid()}.{self.config.port}"
        return True

    def release_port(self) -> None:
        for sock in (self.reservation, self.port_lock):
            if sock is not None:
                sock.close()
        self.reservation = self.port_lock = None

    def spawn(self, index: int, quick_deaths: int = 0) -> None:
        metrics = InheritedFd(self.metrics_fd)
        assert self.port_lock is not None
        lock = InheritedFd(self.port_lock.fileno())
        process = self.context.Process(
            target=run,
            args=(self.config, index, self.group, os.getpid(), metrics, lock),
            name=f"signaling-sharded-worker-{index}",
        )
        process.start()
        self.metrics.set_up(index, True)
        self.slots[index] = Slot(index, process, quick_deaths=quick_deaths)
        log(logging.INFO, "worker started", worker=index, pid=process.pid)

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        """Serve until drained; returns the process exit code."""
        if not self.take_port():
            os.close(self.metrics_fd)
            return 1
        check_migrate_req()
        if self.config.auth_secret is not None and auth.weak_secret(self.config.auth_secret):
            log(
                logging.WARNING,
                f"the auth secret is shorter than {auth.MIN_SECRET_BYTES} bytes, "
                "the minimum RFC 7518 recommends for HS256",
            )
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        os.set_blocking(wake_read, False)
        signal.set_wakeup_fd(wake_write)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.record_signal)
        log(
            logging.INFO,
            "starting",
            workers=self.config.workers,
            host=self.config.host,
            port=self.config.port,
        )
        for index in range(self.config.workers):
            self.spawn(index)
        try:
            while self.slots:
                sentinels = [slot.process.sentinel for slot in self.slots.values()]
                multiprocessing.connection.wait([*sentinels, wake_read], timeout=1.0)
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 512)
                self.handle_signals()
                self.reap()
                self.enforce_drain_deadline()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_read)
            os.close(wake_write)
            os.close(self.metrics_fd)
            self.release_port()
        log(logging.INFO, "stopped", exit_code=self.exit_code)
        return self.exit_code

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if self.stopping_since is None:
                log(logging.INFO, "draining", signal=name)
                self.stop_all(signal.SIGTERM)
            else:
                log(logging.WARNING, "second signal: exiting now", signal=name)
                self.stop_all(signal.SIGKILL)

    def stop_all(self, sig: int) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        for slot in self.slots.values():
            if slot.process.pid is not None and slot.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, sig)

    def enforce_drain_deadline(self) -> None:
        if self.stopping_since is None:
            return
        grace = KILL_GRACE + (webhooks.FLUSH_ON_STOP if self.config.webhook_urls else 0.0)
        if time.monotonic() - self.stopping_since > self.config.drain_timeout + grace:
            self.stop_all(signal.SIGKILL)

    def reap(self) -> None:
        for index, slot in list(self.slots.items()):
            code = slot.process.exitcode
            if code is None:
                continue
            slot.process.join()
            del self.slots[index]
            self.metrics.set_up(index, False)
            if self.stopping_since is not None:
                continue
            log(logging.ERROR, "worker died", worker=index, pid=slot.process.pid, exit_code=code)
            if code == EXIT_BOOT_ERROR:
                self.fail(f"worker {index} could not start")
                return
            lived = time.monotonic() - slot.started
            quick_deaths = slot.quick_deaths + 1 if lived < CRASH_WINDOW else 0
            if quick_deaths >= CRASH_LIMIT:
                self.fail(f"worker {index} died {quick_deaths} times within {CRASH_WINDOW} s")
                return
            self.metrics.count_restart(index)
            self.spawn(index, quick_deaths)

    def fail(self, reason: str) -> None:
        log(logging.ERROR, "stopping the server", reason=reason)
        self.exit_code = 1
        self.stop_all(signal.SIGTERM)
