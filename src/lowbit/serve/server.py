"""Running the app with uvicorn: in the foreground (``lowbit serve``) or in a background thread (tests, bench).

:class:`LowbitServer` is uvicorn's server with lowbit's shutdown, in stages (docs/SERVE.md):

1. on the first Ctrl-C / SIGTERM the engine stops accepting: new requests, on new or kept-alive connections,
   get 503 ``shutting_down`` with ``Retry-After``, and ``/health`` answers 503 ``draining``;
2. the drain window (``drain_timeout`` s): queued and running requests are served to the end, queued ones
   admitted as room frees; a second Ctrl-C ends the window at once;
3. whatever is left is answered -- a 503 JSON body, or an SSE error chunk then ``data: [DONE]`` -- and the
   engine thread stops;
4. uvicorn's own shutdown: listeners and idle connections close, final responses get `flush_timeout` s to be
   written; a response still unwritten then is ended by the app's gate (503 / error chunk), without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.request

import uvicorn

log = logging.getLogger("lowbit.serve")
FLUSH_TIMEOUT_S = 10.0


class LowbitServer(uvicorn.Server):
    """uvicorn's server, draining the app's engine (``app.state.engine``) before closing connections."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float | None = None):
        super().__init__(config)
        state = getattr(config.app, "state", None)
        self.engine = getattr(state, "engine", None)
        self.drain_timeout = drain_timeout if drain_timeout is not None else getattr(state, "drain_timeout", 60.0)
        self.shutdown_report: dict = {}

    async def shutdown(self, sockets=None) -> None:
        engine = self.engine
        if engine is not None and engine.alive:
            engine.stop_accepting()
            stats = engine.stats()
            log.info("shutting down: draining %d running and %d queued requests for up to %g s (new requests get 503; "
                     "Ctrl-C again to stop now)", stats["running"], stats["waiting"], self.drain_timeout)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.drain_timeout
            while not engine.idle and not self.force_exit and loop.time() < deadline:
                await asyncio.sleep(0.05)
            left = await asyncio.to_thread(engine.shutdown, False)
            self.shutdown_report = {"failed": left, "forced": self.force_exit}
            if left:
                log.warning("drain %s: %d unfinished requests answered with 503 / an SSE error chunk",
                            "stopped by a second Ctrl-C" if self.force_exit else "window over", left)
            deadline = loop.time() + FLUSH_TIMEOUT_S  # let the handlers write those answers
            while self.server_state.tasks and loop.time() < deadline and not self.force_exit:
                await asyncio.sleep(0.02)
        await super().shutdown(sockets)
        if self.force_exit and self.lifespan is not None:  # uvicorn skips it then; the app's would be cancelled at
            try:  # exit and log that as a traceback. The engine is stopped already: this is quick.
                await asyncio.wait_for(self.lifespan.shutdown(), timeout=FLUSH_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("the app's shutdown did not finish in %g s", FLUSH_TIMEOUT_S)


def _config(app, log_level: str, **kwargs) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=FLUSH_TIMEOUT_S, **kwargs)


class BackgroundServer:
    """uvicorn in a daemon thread on an already-bound socket (port 0 = a free port); ``stop()`` shuts it down in
    :class:`LowbitServer`'s stages (``stop(force=True)`` as a second Ctrl-C would)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = LowbitServer(_config(app, log_level), drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="lowbit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start on {self.url}")

    def begin_stop(self, force: bool = False) -> None:
        """As Ctrl-C (`force`: as a second Ctrl-C); returns at once."""
        self.server.should_exit = True
        if force:
            self.server.force_exit = True

    def stop(self, timeout: float = 120.0, force: bool = False) -> None:
        self.begin_stop(force)
        self.thread.join(timeout=timeout)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _log_to_stderr(level: str) -> None:
    """Show the ``lowbit.serve`` log lines (disconnects, faults, shutdown) the way uvicorn shows its own."""
    logger = logging.getLogger("lowbit.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               drain_timeout: float | None = None) -> None:
    """Serve in the foreground until interrupted (shutdown in :class:`LowbitServer`'s stages)."""
    _log_to_stderr(log_level)
    LowbitServer(_config(app, log_level, host=host, port=port), drain_timeout).run()
