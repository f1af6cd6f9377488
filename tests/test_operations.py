"""Running the server: faults under operation, and settings checked at start.

Each fault is real: signals sent to the server's processes, a descriptor
limit set on the server as ``ulimit -n`` would, a second server started on
the port of a first. A bad setting must stop the command at once with a
one-line usage error (exit 2, no traceback), never start a server that then
fails quietly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXECUTABLE, Server, free_port, topics_owned
from redis_server import RedisServer
from test_abuse import ensure_fd_limit, upgrade_request
from wsclient import TIMEOUT, RawClient, http_get, websocket_headers

# --- settings ---------------------------------------------------------------------


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``signaling-sharded`` with *args*, which must not start a server."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALING_")}
    environment.pop("PORT", None)
    try:
        return subprocess.run(
            [str(EXECUTABLE), *args],
            capture_output=True,
            text=True,
            timeout=15,
            env={**environment, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args} {env}: started a server instead of refusing") from exc


BAD_SETTINGS = [
    pytest.param(["--port", "99999"], {}, "--port", id="port-too-large"),
    pytest.param(["--port", "-1"], {}, "--port", id="port-negative"),
    pytest.param([], {"PORT": "abc"}, "PORT", id="PORT-not-a-number"),
    pytest.param([], {"SIGNALING_PORT": "80a"}, "SIGNALING_PORT", id="SIGNALING_PORT-not-a-number"),
    pytest.param(["--workers", "0"], {}, "--workers", id="no-workers"),
    pytest.param(["--ping-interval", "inf"], {}, "--ping-interval", id="infinite-ping-interval"),
    pytest.param(["--ping-timeout", "nan"], {}, "--ping-timeout", id="nan-ping-timeout"),
    pytest.param(["--log-level", "loud"], {}, "--log-level", id="unknown-log-level"),
    pytest.param(["--resume-window", "-1"], {}, "--resume-window", id="negative-resume-window"),
    pytest.param(
        ["--redis-flush-delay", "-0.001"], {}, "--redis-flush-delay", id="negative-flush-delay"
    ),
    pytest.param(
        ["--redis-flush-delay", "0.2"], {}, "--redis-flush-delay", id="flush-delay-too-long"
    ),
    pytest.param([], {"SIGNALING_RESUME_SECRET": ""}, "SIGNALING_RESUME_SECRET", id="empty-resume"),
    pytest.param(["--redis", "localhost:6379"], {}, "--redis", id="redis-without-scheme"),
    pytest.param(["--redis", "http://127.0.0.1:6379"], {}, "--redis", id="redis-other-scheme"),
    pytest.param(
        ["--redis", "redis+sentinel://127.0.0.1:26379"], {}, "--redis", id="sentinel-no-service"
    ),
    pytest.param(
        [],
        {"SIGNALING_REDIS_URL": "redis+sentinel://s:7/m?tls=1"},
        "SIGNALING_REDIS_URL",
        id="sentinel-unknown-option",
    ),
    pytest.param(["--redis", "redis+sentinel://s:0/m"], {}, "--redis", id="sentinel-port-zero"),
    pytest.param(["--redis", "unix:///run/redis.sock"], {}, "--redis", id="redis-unix-socket"),
    pytest.param(["--auth-secret", ""], {}, "--auth-secret", id="empty-auth-secret"),
    pytest.param([], {"SIGNALING_AUTH_SECRET": ""}, "SIGNALING_AUTH_SECRET", id="empty-secret-env"),
    pytest.param(["--allowed-origin", "*"], {}, "--allowed-origin", id="origin-star"),
    pytest.param(
        ["--allowed-origin", "https://app.example/"], {}, "--allowed-origin", id="origin-slash"
    ),
    pytest.param(["--allowed-origin", "app.example"], {}, "--allowed-origin", id="origin-bare"),
    pytest.param(["--stun-uri", "http://stun.example"], {}, "--stun-uri", id="stun-not-stun"),
    pytest.param(["--turn-uri", "turn:t.example"], {}, "--turn-secret", id="turn-no-secret"),
    pytest.param(
        ["--turn-uri", "turn:t.example", "--turn-secret", ""], {}, "--turn-secret", id="turn-empty"
    ),
    pytest.param(
        ["--webhook-url", "http://h.example/x"], {}, "--webhook-secret", id="hook-unsigned"
    ),
    pytest.param(
        ["--webhook-secret", "sixteen-chars-or-more"], {}, "--webhook-url", id="hook-secret-alone"
    ),
    pytest.param(
        ["--webhook-url", "ftp://h.example/x", "--webhook-secret", "s" * 16],
        {},
        "--webhook-url",
        id="hook-not-http",
    ),
    pytest.param(
        [],
        {"SIGNALING_WEBHOOK_URL": "http://h.example:99999/", "SIGNALING_WEBHOOK_SECRET": "s" * 16},
        "SIGNALING_WEBHOOK_URL",
        id="hook-bad-port",
    ),
    pytest.param(
        ["--webhook-url", "http://h.example/x", "--webhook-secret", "short"],
        {},
        "--webhook-secret",
        id="hook-short-secret",
    ),
    pytest.param(["--webhook-queue", "0"], {}, "--webhook-queue", id="hook-no-queue"),
    pytest.param(["--relay-type", "offer"], {}, "--relay-type", id="relay-type-taken"),
    pytest.param(["--relay-type", "Bye!"], {}, "--relay-type", id="relay-type-bad-name"),
    pytest.param(
        [], {"SIGNALING_RELAY_TYPE": "bye,broadcast"}, "SIGNALING_RELAY_TYPE", id="rt-env"
    ),
    pytest.param(["--broadcast", "maybe"], {}, "--broadcast", id="broadcast-not-on-off"),
    pytest.param(["--broadcast-rate", "0"], {}, "--broadcast-rate", id="broadcast-rate-zero"),
    pytest.param(["--max-broadcast-size", "-5"], {}, "--max-broadcast-size", id="broadcast-size"),
]


@pytest.mark.parametrize(("args", "env", "named"), BAD_SETTINGS)
def test_a_bad_setting_is_a_one_line_usage_error(
    args: list[str], env: dict[str, str], named: str
) -> None:
    if "--port" not in args and not {"PORT", "SIGNALING_PORT"} & env.keys():
        args = ["--port", str(free_port()), *args]
    result = run_command("--host", "127.0.0.1", *args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr, result.stdout[-2000:])
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert named in lines[0], lines[0]
    assert lines[0].startswith("signaling-sharded: error: "), lines[0]


def test_help_names_each_default_once() -> None:
    result = run_command("--help")
    assert result.returncode == 0, result.stderr
    blocks = re.split(r"\n(?=  -)", result.stdout)
    options = [block for block in blocks if block.startswith("  -")]
    assert len(options) > 20, result.stdout
    for block in options:
        text = " ".join(block.split())
        assert text.count("default") <= 1, text


# --- faults -----------------------------------------------------------------------


def worker_pids(srv: Server, workers: int) -> list[int]:
    records = srv.wait_records("listening", count=workers)
    return [record["pid"] for record in records[-workers:]]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def test_sigterm_while_request_lines_are_partial_drains_cleanly(
    start_server: Callable[..., Server],
) -> None:
    """Workers holding connections whose request line has not arrived stop
    cleanly on SIGTERM: exit 0, no traceback, every worker says it stopped."""
    slow = 400
    ensure_fd_limit(slow + 200)
    srv = start_server("--workers", "2")
    pids = worker_pids(srv, 2)
    before = sum(open_fds(pid) for pid in pids)
    sockets = []
    try:
        for n in range(slow):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
            sock.sendall(f"GET /ws/slow-{n}".encode())  # no end of line
            sockets.append(sock)
        wait_for(
            # Most of them: the workers open and close a few descriptors of
            # their own meanwhile.
            lambda: sum(open_fds(pid) for pid in pids) >= before + slow * 0.95,
            "the workers hold the slow connections",
            timeout=20,
        )
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.wait_exit() == 0, srv.output()
    finally:
        for sock in sockets:
            sock.close()
    assert "Traceback" not in srv.output(), srv.output()
    stopped = {
        r["worker"] for r in srv.log_records() if r.get("msg") == "stopped" and "worker" in r
    }
    assert stopped == {0, 1}, srv.output()


def test_one_sigterm_to_the_whole_process_group_is_one_drain(
    start_server: Callable[..., Server],
) -> None:
    """systemd's default KillMode, `timeout` and `kill -- -PGID` signal every
    process at once: the workers must drain (close 1001), not exit at once."""
    srv = start_server("--workers", "2")
    worker_pids(srv, 2)
    clients = [RawClient.join(srv.port, f"/ws/{topic}")[0] for topic in topics_owned(2, "group")]
    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
        for client in clients:
            assert client.expect_close() == 1001
            client.close()
    finally:
        for client in clients:
            client.close()
    assert srv.wait_exit() == 0, srv.output()
    records = srv.log_records()
    assert not [r for r in records if r.get("msg") == "second signal: exiting now"], srv.output()
    draining = {r["worker"] for r in records if r.get("msg") == "draining" and "worker" in r}
    assert draining == {0, 1}, srv.output()


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_out_of_descriptors_answers_503_and_recovers(
    start_server: Callable[..., Server], workers: int
) -> None:
    """At the descriptor limit the server neither spins nor resets: every
    client gets 101 or 503, the log says so a few times, not thousands,
    and the server serves again once descriptors are free."""
    clients = 300
    ensure_fd_limit(clients + 300)
    srv = start_server("--workers", str(workers), fd_limit=128)
    pids = worker_pids(srv, workers)
    statuses: list[int] = []
    sockets: list[socket.socket] = []
    try:
        for n in range(clients):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
            sockets.append(sock)
            sock.sendall(upgrade_request(srv.port, f"fd-{n}"))
        for sock in sockets:
            head = b""
            while b"\r\n\r\n" not in head:
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b"<reset>"
                assert chunk and chunk != b"<reset>", f"no answer after {len(statuses)}: {head!r}"
                head += chunk
            statuses.append(int(head.split(b" ", 2)[1]))
        assert set(statuses) <= {101, 503}, sorted(set(statuses))
        assert statuses.count(503) > 0, "the limit was never reached"
        assert statuses.count(101) > 50 * workers, statuses.count(101)
        # Still at the limit: the workers wait rather than spin.
        spent = [cpu_seconds(pid) for pid in pids]
        started = time.monotonic()
        health = http_get(srv.port, "/healthz")
        assert health.status in (200, 503), health
        wait_for(lambda: time.monotonic() - started > 1.0, "a second at the limit")
        busy = [cpu_seconds(pid) - spent[i] for i, pid in enumerate(pids)]
        assert max(busy) < 0.5, f"CPU seconds in one second at the limit: {busy}"
    finally:
        for sock in sockets:
            sock.close()
    records = srv.log_records()
    warnings = [
        r for r in records if r.get("level") == "WARNING" and "descriptor" in r.get("msg", "")
    ]
    assert 1 <= len(warnings) <= 4 * workers, warnings[:5]
    assert not [r for r in records if r.get("msg") == "accept failed"], "one line per failure"
    # Descriptors are free again: a join succeeds.
    deadline = time.monotonic() + 10
    while True:
        response = http_get(srv.port, "/ws/after-limit", websocket_headers())
        if response.status == 101 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status == 101, response
    assert "Traceback" not in srv.output(), srv.output()


def test_the_descriptor_limit_is_raised_to_the_hard_one_and_its_cap_is_said(
    start_server: Callable[..., Server],
) -> None:
    """Started with a soft limit of 256 under a hard one of 1024, the
    server takes the hard one (and says so), holds 400 connections, and
    warns that 1024 descriptors cap the default --max-connections."""
    clients = 400
    ensure_fd_limit(1024)  # the server's hard limit cannot be raised past ours
    srv = start_server("--workers", "1", fd_limit=(256, 1024))
    raised = srv.records("raised the open file limit from 256 to 1024, the hard limit")
    assert [r["level"] for r in raised] == ["INFO"], srv.output()
    capped = [r for r in srv.log_records() if "caps each worker" in r.get("msg", "")]
    assert [r["level"] for r in capped] == ["WARNING"], srv.output()
    assert "about 959 connections, fewer than --max-connections 50000" in capped[0]["msg"]
    clients_open = [RawClient.join(srv.port, f"/ws/many-{n % 10}")[0] for n in range(clients)]
    try:
        wanted = 'process_max_fds{worker="0"} 1024'
        wait_for(lambda: wanted in http_get(srv.port, "/metrics").body.decode(), wanted)
    finally:
        for client in clients_open:
            client.close()
    assert "Traceback" not in srv.output(), srv.output()


def test_no_cap_is_said_when_the_limit_leaves_room(start_server: Callable[..., Server]) -> None:
    ensure_fd_limit(1024)
    srv = start_server("--workers", "2", "--max-connections", "100", fd_limit=(1024, 1024))
    said = [r["msg"] for r in srv.log_records() if "open file limit" in r.get("msg", "")]
    assert said == [], said


@pytest.mark.parametrize(
    ("first", "second"), [(1, 2), (2, 1), (2, 2)], ids=["1-then-2", "2-then-1", "2-then-2"]
)
def test_a_second_server_on_a_busy_port_stops_with_a_clear_error(
    start_server: Callable[..., Server], tmp_path: Path, first: int, second: int
) -> None:
    srv = start_server("--workers", str(first))
    other = Server(tmp_path, "--workers", str(second), port=srv.port)
    try:
        code = other.wait_exit()
    finally:
        other.stop()
    assert code not in (None, 0), other.output()
    assert "Traceback" not in other.output(), other.output()
    errors = [r for r in other.log_records() if r.get("level") == "ERROR"]
    assert any(str(srv.port) in str(r) and "in use" in str(r) for r in errors), other.output()
    # The first server alone still serves the port: every topic is exact.
    for topic in topics_owned(first, "busy") * 3:
        a, a_id = RawClient.join(srv.port, f"/ws/{topic}")
        with a:
            b = RawClient.connect(srv.port, f"/ws/{topic}")
            with b:
                b.recv_json()
                peers = b.recv_json()["peers"]
                assert [peer["id"] for peer in peers] == [a_id], (topic, peers)


def test_port_0_gives_every_worker_the_same_port(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--workers", "2", port=0)
    try:
        records = srv.wait_records("listening", count=2)
        ports = {record["port"] for record in records}
        assert len(ports) == 1 and 0 not in ports, records
        srv.port = ports.pop()
        served = set()
        for topic in topics_owned(2, "zero"):
            response = http_get(srv.port, f"/ws/{topic}", websocket_headers())
            assert response.status == 101, response
            served.add(int(response.headers["x-signaling-worker"]))
        assert served == {0, 1}
        starting = [r for r in srv.log_records() if r.get("msg") == "starting"]
        assert starting and starting[0]["port"] == srv.port, starting
    finally:
        srv.stop()


@pytest.fixture
def redis_later(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis on a free port, not started yet."""
    import shutil

    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(executable, tmp_path)
    yield server
    server.stop()


def test_unreachable_redis_is_said_once_and_so_is_its_return(
    start_server: Callable[..., Server], redis_later: RedisServer
) -> None:
    srv = start_server("--workers", "1", "--log-level", "debug", "--redis", redis_later.url)
    srv.wait_records("cluster unreachable", count=3)  # three attempts, at debug after the first
    redis_later.start()
    srv.wait_records("cluster ready")
    said: list[dict[str, Any]] = [
        r for r in srv.log_records() if r.get("level") in ("WARNING", "ERROR", "INFO")
    ]
    unreachable = [r for r in said if r.get("msg") == "cluster unreachable"]
    assert len(unreachable) == 1 and unreachable[0]["level"] == "WARNING", unreachable
    assert not [r for r in said if "traceback" in r], said
    back = [r for r in said if r.get("msg") == "cluster ready"]
    assert back and back[0].get("after_s") is not None, back


def test_origin_refusals_are_logged_once_per_origin(start_server: Callable[..., Server]) -> None:
    srv = start_server("--allowed-origin", "https://a.example")
    headers = {**websocket_headers(), "Origin": "https://b.example"}
    for _ in range(5):
        assert http_get(srv.port, "/ws/o", {**headers, **websocket_headers()}).status == 403
    refused = srv.wait_records("origin refused", origin="https://b.example")
    assert len(refused) == 1, refused
    other = {**websocket_headers(), "Origin": "https://c.example"}
    assert http_get(srv.port, "/ws/o", other).status == 403
    srv.wait_records("origin refused", origin="https://c.example")
