"""FastAPI + uvicorn: offloop.lifespan(sv) runs the services; a crash stops uvicorn."""

from __future__ import annotations

import requests

from tests.helpers import QUICK_WAIT

from .conftest import HostProc


def test_fastapi_under_uvicorn_serves_through_each_service_and_stops_on_a_crash() -> None:
    with HostProc("fastapi_host") as proc:
        port = proc.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
        base = f"http://127.0.0.1:{port}"
        flask_url = requests.get(f"{base}/side", timeout=QUICK_WAIT).json()
        assert (
            requests.get(f"{flask_url}/echo", params={"text": "direct"}, timeout=QUICK_WAIT).text
            == "flask direct"
        )
        for kind in ("flask", "thread", "async"):
            answer = requests.get(f"{base}/ask/{kind}", params={"text": "hi"}, timeout=QUICK_WAIT)
            assert answer.json() == f"{kind} hi"
        assert requests.post(f"{base}/crash/thread", timeout=QUICK_WAIT).ok
        code, took = proc.ends_after_failure("thread", r"Finished server process")
    # uvicorn stops gracefully on the SIGTERM, then raises it again: killed by SIGTERM.
    assert code == -15, proc.output
    assert took < 1.0, proc.output
    out = proc.output
    assert "Shutting down" in out
    assert "ServiceFailed: Service 'thread' failed: it crashed" in out
