"""aiogram 3 and python-telegram-bot, polling a fake Telegram API: a crash stops the bot."""

from __future__ import annotations

import re

import pytest

from .conftest import HostProc
from .fake_api import FakeAPI


@pytest.mark.parametrize(("module", "crash"), [("aiogram_host", "async"), ("ptb_host", "thread")])
def test_a_telegram_bot_answers_through_each_service_and_stops_on_a_crash(
    fake_api: FakeAPI, token: str, module: str, crash: str
) -> None:
    with HostProc(module, fake_api.url, token) as proc:
        proc.wait_for(r"all 3 service\(s\) ready")
        fake_api.push(token, "/ask")
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        fake_api.push(token, f"/crash {crash}")
        code, took = proc.ends_after_failure(
            crash, rf"^offloop.ServiceFailed: Service '{crash}' failed"
        )
    assert code == 1, proc.output
    assert took < 1.0, proc.output
    # The program ended with the failure, raised by the bot's shutdown hook.
    assert f'{module}.py", line' in proc.output
    assert re.search(r"in stop_services\n +await sv\.aclose\(\)", proc.output), proc.output
