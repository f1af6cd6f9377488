"""cli: the settings as the command line and the environment give them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from signaling_sharded.server import cli
from signaling_sharded.server.config import Config


def parse(*argv: str) -> Config:
    return cli.parse_config(list(argv))


def test_defaults_are_the_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "SIGNALING_PORT", "SIGNALING_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    config = parse("--workers", "2")
    defaults = Config()
    for field in ("port", "ping_interval", "max_peers_per_topic", "max_connections", "turn_ttl"):
        assert getattr(config, field) == getattr(defaults, field), field


def test_the_environment_and_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert parse().port == 9000
    monkeypatch.setenv("SIGNALING_PORT", "9001")
    assert parse().port == 9001
    assert parse("--port", "9002").port == 9002
    monkeypatch.setenv("SIGNALING_STUN_URI", "stun:a.example,stun:b.example")
    assert parse().stun_uris == ("stun:a.example", "stun:b.example")


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "65536"],
        ["--ping-interval", "inf"],
        ["--auth-secret", ""],
        ["--redis", "localhost:6379"],
        ["--allowed-origin", "https://a.example/"],
        ["--stun-uri", "http://x"],
        ["--admin-token", "short"],
        ["--admin-token", "sixteen or more but spaces"],
        ["--admin-port", "9000"],
        ["--admin-token", "a-token-of-16-chars", "--admin-host", "127.0.0.1"],
        ["--admin-token", "a-token-of-16-chars", "--port", "9000", "--admin-port", "9000"],
    ],
)
def test_bad_settings_exit_with_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("signaling-sharded: error: "), error


def test_the_admin_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse().admin_token is None
    monkeypatch.setenv("SIGNALING_ADMIN_TOKEN", "a-token-of-16-chars")
    assert parse().admin_token == "a-token-of-16-chars"
    monkeypatch.setenv("SIGNALING_ADMIN_PORT", "9100")
    monkeypatch.setenv("SIGNALING_ADMIN_HOST", "127.0.0.1")
    config = parse()
    assert (config.admin_port, config.admin_host) == (9100, "127.0.0.1")


def test_origins_are_normalised() -> None:
    assert cli.origin("HTTPS://App.Example:443") == "https://app.example"
    assert cli.origin("http://localhost:3000") == "http://localhost:3000"
    assert cli.origin("http://[::1]:80") == "http://[::1]"


def test_the_cpu_quota_caps_the_workers(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cli.cpu_quota(tmp_path) == 1.5
    assert cli.usable_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cli.cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cli.cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cli.cpu_quota(tmp_path) == 3.0
    assert not math.isnan(cli.usable_cpus(tmp_path))
