"""The wheel: built by maturin, installed into a fresh virtualenv, it runs."""

from __future__ import annotations

import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server
from wsclient import RawClient, http_get

ROOT = Path(__file__).resolve().parent.parent
MATURIN = Path(sys.executable).parent / "maturin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its console script."""
    if not MATURIN.exists():
        pytest.skip("maturin is not installed next to this Python")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [str(MATURIN), "build", "--release", "--quiet", "--out", str(dist)],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = dist.glob("signaling_sharded-*.whl")
    assert "-abi3-" in wheel.name, wheel.name
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=True)
    subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
    )
    return env / "bin" / "signaling-sharded"


@pytest.fixture
def wheel_server(installed: Path, tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path, "--workers", "1", executable=installed)
    server.wait_ready()
    yield server
    assert server.stop() == 0


def test_the_installed_wheel_serves_peers(wheel_server: Server) -> None:
    with RawClient.connect(wheel_server.port, "/ws/from-the-wheel") as client:
        assert client.recv_json()["type"] == "welcome"
        assert client.recv_json() == {"type": "peer-list", "peers": []}


def test_the_installed_wheel_carries_the_browser_demo(wheel_server: Server) -> None:
    for path in ("/", "/signaling.js"):
        response = http_get(wheel_server.port, path)
        assert response.status == 200, path
        assert len(response.body) > 1000, path
