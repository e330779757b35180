"""``offloop check`` on a supervised program whose loop never comes back.

The supervisor cannot stop such a program gracefully: its forced exit (the
watchdog once ``grace`` has run out, or a second signal) ends the process with
``os._exit``. The report, with the block still under way, must come out all
the same: it is what ``offloop check`` was run for.
"""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest

from offloop._cli.check import BLOCKED_EXIT_CODE
from offloop._supervisor.signals import FORCE_MARGIN
from tests.helpers import Proc, line_of

GRACE = 0.1

STUCK = f"""\
    import sys
    import time

    import offloop

    sv = offloop.Supervisor(grace={GRACE}, name="stuck")


    @sv.service
    async def http_service():
        print("serving", flush=True)
        while True:
            time.sleep(0.01)  # BLOCK


    sys.exit(sv.run())
    """


@pytest.mark.parametrize("second_signal", [False, True], ids=["watchdog", "second-signal"])
def test_a_forced_exit_still_writes_the_report_with_the_block_under_way(
    tmp_path: Path, second_signal: bool
) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(STUCK))
    report = tmp_path / "report.json"
    options = ["--json", "--threshold", "0.05", "-o", str(report)]
    with Proc(["-m", "offloop", "check", *options, app.name], tmp_path) as proc:
        proc.wait_for("serving")
        proc.wait_for(r"offloop check: the event loop has been blocked .* \(still blocked\)")
        proc.send(signal.SIGTERM)
        proc.wait_for("received SIGTERM, stopping gracefully")
        if second_signal:
            proc.send(signal.SIGTERM)
        assert proc.exit_code() == BLOCKED_EXIT_CODE, proc.output
    document = json.loads(report.read_text())
    assert document["exit_code"] == BLOCKED_EXIT_CODE
    assert document["script_exit_code"] == 128 + signal.SIGTERM  # the forced exit's
    (site,) = document["sites"]
    assert (site["file"], site["line"], site["function"]) == (
        str(app),
        line_of("BLOCK", app),
        "http_service",
    )
    assert site["count"] == 1
    if not second_signal:
        # The block began before the signal and lasted until the forced exit.
        assert site["max_ms"] >= (GRACE + FORCE_MARGIN) * 1e3
