"""Variant B of the serving benchmark: what a user would write instead of an ensemble. A
plain FastAPI app under uvicorn, one worker process per core, that runs the same trained
stage networks through the plain eager pipeline for each request: torch eager, no
per-item cache, no batching across requests.

    python -m dynemb.bench.plain_server --repository model_repository --port 8600

POST /embed {"events": [{"time", "text", "image" (base64 or null), "labels"}], "at"}
answers {"embedding": [...]}; GET /health answers once the pipeline is loaded.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from pydantic import BaseModel

REPOSITORY_ENV = "DYNEMB_PLAIN_SERVER_REPOSITORY"


class EventIn(BaseModel):
    time: float
    text: str = ""
    image: str | None = None  # base64
    labels: list[str] = []


class EmbedIn(BaseModel):
    events: list[EventIn]
    at: float | None = None


def create_app():  # -> fastapi.FastAPI (imported here: only the server process needs it)
    import torch
    from fastapi import FastAPI, HTTPException

    from dynemb.bench.inprocess import pipeline_dims
    from dynemb.pipeline import Pipeline, eager_uncached
    from dynemb_client import ClientInputError, Event, build_inputs

    torch.set_num_threads(1)  # one process per core, as the Triton stages run
    pipeline = Pipeline.from_repository(Path(os.environ[REPOSITORY_ENV]), eager_uncached())
    dims = pipeline_dims(pipeline)

    app = FastAPI(title="dynemb plain server (benchmark baseline)")

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/embed")
    def embed(body: EmbedIn) -> dict[str, list[float]]:
        events = [
            Event(e.time, e.text, base64.b64decode(e.image) if e.image else None, e.labels)
            for e in body.events
        ]
        try:
            x = build_inputs([events], [body.at], dims.max_events, dims.max_labels)
        except ClientInputError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"embedding": pipeline.embed(x)[0].tolist()}

    return app


def serve_one(host: str, port: int) -> None:
    """One uvicorn worker on its own SO_REUSEPORT socket: the kernel spreads connections
    over the workers. TCP_NODELAY is set on it because sockets handed to uvicorn (as its
    own --workers do) answered every request ~43 ms late here, a Nagle/delayed-ACK stall:
    56 ms p50 at one client instead of 15 ms."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by connections
    sock.bind((host, port))
    config = uvicorn.Config(create_app(), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    import multiprocessing as mp
    import signal

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    os.environ[REPOSITORY_ENV] = str(args.repository.resolve())
    context = mp.get_context("spawn")
    workers = [
        context.Process(target=serve_one, args=(args.host, args.port), daemon=True)
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    signal.signal(signal.SIGTERM, lambda *_: [w.terminate() for w in workers])
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
