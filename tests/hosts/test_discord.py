"""discord.py 2: setup_hook starts the services, close stops them; a crash ends client.run()."""

from __future__ import annotations

import re
import signal

from .conftest import HostProc
from .fake_api import FakeAPI


def test_a_discord_client_answers_through_each_service_and_stops_on_a_crash(
    fake_api: FakeAPI, token: str
) -> None:
    with HostProc("discord_host", fake_api.url, token) as proc:
        proc.wait_for(r"all 3 service\(s\) ready")
        fake_api.push(token, "/ask")
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        fake_api.push(token, "/crash async")
        code, took = proc.ends_after_failure(
            "async", r"^offloop.ServiceFailed: Service 'async' failed"
        )
    assert code == 1, proc.output
    assert took < 1.0, proc.output
    # close() ended with the failure, and client.run() with it.
    assert re.search(r"in close\n +await sv\.aclose\(\)", proc.output), proc.output


def test_sigterm_closes_the_discord_client_and_stops_the_services(
    fake_api: FakeAPI, token: str
) -> None:
    # client.run() stops on Ctrl-C only: without the recipe's SIGTERM
    # handler, 'docker stop' would kill the process with no shutdown at all.
    with HostProc("discord_host", fake_api.url, token) as proc:
        proc.wait_for(r"all 3 service\(s\) ready")
        fake_api.push(token, "/ask")  # connected
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        proc.send(signal.SIGTERM)
        code = proc.exit_code()
    assert code == 0, proc.output
    assert "stopping (aclose() was called)" in proc.output
    assert "side: stopped" in proc.output
