"""`python -m service` / `imgserve`: run the API under uvicorn, in one process or (IMGSERVE_WORKERS)
several behind one port (see service/workers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from types import FrameType

from pydantic import ValidationError

from service.settings import Settings

WORKER = os.environ.get("IMGSERVE_WORKER_INDEX")  # set by the supervisor in each server process


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if WORKER is not None:
            doc["worker"] = int(WORKER) + 1
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    who = f" [process {int(WORKER) + 1}]" if WORKER is not None else ""
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter(f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main() -> int:
    try:
        settings = Settings.load()
    except ValidationError as exc:
        print(f"invalid settings (IMGSERVE_* environment variables):\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    if settings.onednn:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from service import workers

    if WORKER is None and settings.process_count > 1:
        return workers.Supervisor(settings.host, settings.port, settings.process_count,
                                  settings.shutdown_delay_s + settings.drain_timeout_s + 10, settings.grpc_port).run()
    return serve(settings, workers.listening_socket())


def serve(settings: Settings, sock: socket.socket | None) -> int:
    """One server process: on its own port, or on the supervisor's socket."""
    import uvicorn

    from service.app import create_app

    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Readiness turns 503 at once and new requests are refused; uvicorn then stops
            # accepting connections and waits for requests in flight, and the lifespan drains.
            if not app.state.draining:
                logging.getLogger("service").info("signal %d: draining", sig)
                app.state.draining = True
                if settings.shutdown_delay_s > 0:
                    loop = asyncio.get_event_loop()
                    loop.call_later(settings.shutdown_delay_s, super().handle_exit, sig, frame)
                    return
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGTERM after its shutdown; a completed drain is a clean exit (status 0).
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
    )
    server = Server(config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
