"""aiogram 3 and python-telegram-bot, polling a fake Telegram API: a crash stops the bot."""

from __future__ import annotations

import re
import signal

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


def test_ctrl_c_while_ptb_runs_post_init_stops_the_services_quietly(
    fake_api: FakeAPI, token: str
) -> None:
    # python-telegram-bot leaves its post_init task behind on Ctrl-C and runs
    # post_shutdown: aclose() stops the start that task awaits, and the error
    # start() then raises there, which nobody can await any more, must not be
    # logged as "Task exception was never retrieved" as the program exits.
    with HostProc("ptb_host", fake_api.url, token, "stall") as proc:
        proc.wait_for("STALLED STARTING")
        proc.send(signal.SIGINT)
        code = proc.exit_code()
    assert code == 0, proc.output
    assert "service 'thread' stopped" in proc.output
    assert "side: stopped" in proc.output
    assert "never retrieved" not in proc.output, proc.output


def test_ptb_without_post_shutdown_still_tells_the_thread_services_to_stop(
    fake_api: FakeAPI, token: str
) -> None:
    # run_polling closes its loop without cancelling the tasks left on it, so
    # a program that forgets post_shutdown never stops the supervisor. The
    # loop's close() still sets the thread services' stop tokens, and the log
    # says what to add.
    with HostProc("ptb_host", fake_api.url, token, "noshutdown") as proc:
        proc.wait_for(r"all 4 service\(s\) ready")
        # Polling, not still bootstrapping (a Ctrl-C there is an error of the bot's).
        fake_api.push(token, "/ask")
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        proc.send(signal.SIGINT)
        code = proc.exit_code()
    assert code == 0, proc.output
    assert (
        "THREAD SERVICE TOLD TO STOP: the supervisor's event loop is shutting down" in proc.output
    )
    assert "its event loop was closed while it ran" in proc.output
    assert "(post_shutdown)" in proc.output


def test_a_crash_while_ptb_sets_up_polling_stops_the_bot_once_it_polls(
    fake_api: FakeAPI, token: str
) -> None:
    # A service that crashes right after post_init's start() returned fails
    # the supervisor while run_polling runs its next step to completion; by
    # the time the services have stopped, that step has ended and the loop
    # runs forever: the bot must still be stopped, not poll on without them.
    with HostProc("ptb_host", fake_api.url, token, "early") as proc:
        proc.wait_for(r"Service 'early' failed")
        fake_api.push(token, "/ask")  # answered once polling: then the stop ends
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        code = proc.exit_code()
    assert code == 1, proc.output
    assert re.search(r"in stop_services\n +await sv\.aclose\(\)", proc.output), proc.output
    assert "offloop.ServiceFailed: Service 'early' failed" in proc.output


def test_a_second_ctrl_c_during_ptb_post_shutdown_says_the_stop_was_cut_short(
    fake_api: FakeAPI, token: str
) -> None:
    # A second Ctrl-C while post_shutdown's aclose() runs makes run_polling
    # close its loop mid-stop: the thread services are still told, and the
    # warning must not tell a program that calls aclose() to call it.
    with HostProc("ptb_host", fake_api.url, token, "slowstop") as proc:
        proc.wait_for(r"all 4 service\(s\) ready")
        fake_api.push(token, "/ask")  # polling, not still bootstrapping
        assert fake_api.next_sent(token) == "flask hi | thread hi | async hi"
        proc.send(signal.SIGINT)
        proc.wait_for("SLOW SERVICE STOPPING")
        proc.send(signal.SIGINT)
        code = proc.exit_code()
    assert code == 0, proc.output  # python-telegram-bot's SystemExit()
    closed = proc.wait_for(r"its event loop was closed while it ran.*").group(0)
    assert "before its stop had finished" in closed, closed
    assert "Call 'await sv.aclose()'" not in closed, closed
