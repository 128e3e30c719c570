"""The baseline for bench/ingest.py: a bare Starlette endpoint that parses JSON and answers 200."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def callback(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"status": "ok", "id": data.get("id")})


app = Starlette(routes=[Route("/callbacks/vlmrun/{token}", callback, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
