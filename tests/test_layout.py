"""The tree keeps its shape: imports point one way, and no source file
grows past what one reader holds (docs/architecture.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 1000
"""Longest source file, in lines; tests and generated files aside."""


def test_imports_point_one_way() -> None:
    """The import-linter contracts of pyproject.toml: the server's layers,
    and the client library apart from the server."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail("import-linter is not installed (it is a test dependency)")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def source_files() -> list[Path]:
    files = [*ROOT.glob("rust/**/*.rs"), *ROOT.glob("bench/**/*.rs")]
    files += [*ROOT.glob("python/**/*.py"), *ROOT.glob("bench/*.py")]
    return [f for f in files if not f.stem.endswith("tests") and "target" not in f.parts]


def test_no_source_file_is_over_a_thousand_lines() -> None:
    files = source_files()
    assert len(files) > 30, files
    long = {
        str(f.relative_to(ROOT)): n
        for f in files
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, long


def test_close_codes_are_the_cores_everywhere() -> None:
    """The close codes are defined once, in the Rust core: the docs list
    every one, and both clients stop on the same final codes."""
    from signaling_sharded._native import CLOSE_CODES
    from signaling_sharded.client import FINAL_CLOSE_CODES

    protocol = (ROOT / "docs" / "protocol.md").read_text()
    for name, code in CLOSE_CODES.items():
        assert f"\n| {code} |" in protocol, f"{name} ({code}) is not in docs/protocol.md"
    script = (ROOT / "python" / "signaling_sharded" / "static" / "signaling.js").read_text()
    found = re.search(r"FINAL_CLOSE_CODES = new Set\(\[([0-9, ]+)\]\)", script)
    assert found is not None, "signaling.js names no FINAL_CLOSE_CODES"
    assert {int(code) for code in found.group(1).split(",")} == set(FINAL_CLOSE_CODES)
