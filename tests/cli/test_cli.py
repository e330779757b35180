"""The command line: --version, help, and the demo as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import offloop


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offloop", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"offloop {offloop.__version__}"
    proc = run_cli()
    assert proc.returncode == 2
    assert "demo" in proc.stderr


def test_unknown_command_is_an_error() -> None:
    proc = run_cli("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
