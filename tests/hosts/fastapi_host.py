"""The FastAPI recipe under real uvicorn: ``python -m tests.hosts.fastapi_host``.

Prints ``SIDE <flask url>`` once the services are up; ``GET /ask/{kind}``
answers through one of them, ``POST /crash/{kind}`` crashes one.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from fastapi import FastAPI

import offloop
from tests.hosts.side import Side

sv = offloop.Supervisor(name="side", grace=2)
side = Side(sv)
app = FastAPI(lifespan=offloop.lifespan(sv))


@app.get("/ask/{kind}")
async def ask(kind: str, text: str) -> str:
    return await side.ask(kind, text)


@app.post("/crash/{kind}")
async def crash(kind: str) -> str:
    side.crash(kind)
    return "crashing"


@app.get("/side")
async def where() -> str:
    return side.web.url


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    uvicorn.run(app, host="127.0.0.1", port=0, log_level="info")
