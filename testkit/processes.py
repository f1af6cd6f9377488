"""The processes the tests and the benchmarks start: the server and
redis-server, each in its own process group, output to files.

One module for both, so a server is started, waited for and stopped the
same way wherever it runs. Failures raise ``RuntimeError`` with the end of
the process's output; the tests turn that into a failure, the benchmarks
into a failed run.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_TIMEOUT = 10.0
"""Seconds a process has to exit after SIGTERM before its group is killed."""


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy(port: int, timeout: float = 1.0) -> bool:
    """Whether ``GET /healthz`` on ``port`` answers 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def pinned(cpu: int | None, command: Sequence[str]) -> list[str]:
    """``command`` run on ``cpu`` alone (taskset), or anywhere for None."""
    if cpu is None or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", str(cpu), *command]


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> bool:
    """Poll ``ready`` until it holds (True), ``alive`` fails or time is up."""
    deadline = time.monotonic() + timeout
    while alive():
        if ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return False


class ServerProcess:
    """A server on ``port`` that answers ``GET /healthz``: stdout goes to
    ``stdout_path``, stderr to ``stderr_path`` (or with stdout). ``cpu``
    pins it to one core; ``fd_limit`` caps its open descriptors as
    ``ulimit -n`` would (a pair: the soft and the hard limit)."""

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        stdout_path: Path,
        *,
        stderr_path: Path | None = None,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        fd_limit: int | tuple[int, int] | None = None,
    ) -> None:
        self.command = list(command)
        self.port = port
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

        def limit() -> None:
            if fd_limit is not None:
                pair = fd_limit if isinstance(fd_limit, tuple) else (fd_limit, fd_limit)
                resource.setrlimit(resource.RLIMIT_NOFILE, pair)

        with contextlib.ExitStack() as files:
            out = files.enter_context(stdout_path.open("wb"))
            err = files.enter_context(stderr_path.open("wb")) if stderr_path else subprocess.STDOUT
            self.proc = subprocess.Popen(
                pinned(cpu, self.command),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=limit if fd_limit is not None else None,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``/healthz`` answers; RuntimeError if it exits or
        does not answer within ``timeout`` seconds."""
        if wait_until(lambda: healthy(self.port), self.running, timeout):
            return
        if self.running():
            self.stop()
            raise RuntimeError(f"not healthy after {timeout:g} s\n{self.output(20_000)}")
        raise RuntimeError(f"exited with {self.proc.returncode}\n{self.output(20_000)}")

    def output(self, limit: int | None = None) -> str:
        """The command and what it wrote (the last ``limit`` characters)."""
        text = self.stdout_path.read_text(errors="replace")
        if self.stderr_path is not None:
            text = f"--- stdout\n{text}--- stderr\n{self.stderr_path.read_text(errors='replace')}"
        if limit is not None:
            text = text[-limit:]
        return f"$ {' '.join(self.command)}\n{text}"

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The exit code, or None if the process still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (a drain), then SIGKILL to the whole process group (its
        workers too) if it has not exited within ``timeout``."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode


class RedisProcess:
    """A throwaway ``redis-server`` on loopback, persistence off: killed and
    started again on the same port, it comes back empty, as a Redis that
    lost its data would."""

    def __init__(
        self,
        executable: str,
        directory: Path,
        *,
        password: str | None = None,
        db: int = 0,
        cpu: int | None = None,
        replica_of: int | None = None,
    ) -> None:
        self.executable = executable
        self.directory = directory
        #: With a password, clients must AUTH (``--requirepass``), and so
        #: must it to its master (``--masterauth``: replicas share it).
        self.password = password
        #: The port of the master this one starts as a replica of.
        self.replica_of = replica_of
        self.db = db
        self.cpu = cpu
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/{self.db}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        """Whether it answers PING (after AUTH, with a password)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                request = b"*1\r\n$4\r\nPING\r\n"
                if self.password:
                    auth = self.password.encode()
                    request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(auth), auth) + request
                sock.sendall(request)
                return b"+PONG" in sock.recv(256)
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        """Start it on ``port`` and wait until it answers PING."""
        assert not self.running(), "redis-server already runs"
        self.starts += 1
        log = self.directory / f"redis-{self.port}-{self.starts}.log"
        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        command += ["--daemonize", "no", "--logfile", ""]
        if self.password:
            command += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(self.cpu, command),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_until(self.answers, self.running, timeout):
            self.stop()
            raise RuntimeError(
                f"redis-server did not answer within {timeout:g} s:\n"
                + log.read_text(errors="replace")
            )

    def start_on_free_port(self, attempts: int = 5) -> None:
        """``start``, on another free port if the one picked was taken meanwhile."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def stop(self) -> None:
        """Kill it (SIGKILL: no shutdown, no save) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
