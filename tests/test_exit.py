"""A program whose loop ends while a worker is stuck exits promptly, with a warning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

STUCK_PROGRAM = """
import asyncio, time, offloop

async def main():
    try:
        await asyncio.wait_for(offloop.to_thread(time.sleep, 60), 0.1)
    except asyncio.TimeoutError:
        print("gave up waiting", flush=True)

asyncio.run(main())
print("loop finished", flush=True)
"""


def test_stuck_worker_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(STUCK_PROGRAM))
    # asyncio.to_thread would keep this process alive for the full 60 s
    # (asyncio.run joins the default executor); the bound below is far shorter.
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gave up waiting", "loop finished"]
    assert "builtin_function_or_method 'sleep'" in proc.stderr
    assert "offloop-default-1" in proc.stderr
    assert "still running at interpreter exit and was abandoned" in proc.stderr
