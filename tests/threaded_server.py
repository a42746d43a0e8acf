"""A service on its own event loop in a background thread: several services in one test
process each keep their loop responsive."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from services.common.config import ServiceConfig
from services.common.server import RunningServer

# Beyond the server's own bounds on its stop (grace, then close_timeout per part): only a stop
# that is really stuck gets here, and then it fails the test instead of hanging it.
STOP_SLACK = 60.0


class ThreadedServer:
    def __init__(self, start: Callable[[Any], Coroutine[Any, Any, RunningServer]], cfg: ServiceConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{type(cfg).__name__}-loop", daemon=True)
        self._thread.start()
        self._stop_lock = threading.Lock()  # the first stop holds it to its end; later ones wait, then return
        self._stopped = False
        try:
            self.server: RunningServer = asyncio.run_coroutine_threadsafe(start(cfg), self.loop).result()
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the service's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, grace: float = 0.0) -> None:
        """Stop the server, then its loop. Idempotent and safe from several threads: the loop
        stops only once every stop is done with it (a second stop that reached a loop the first
        had stopped would wait forever for its coroutine)."""
        with self._stop_lock:
            if self._stopped:
                return
            try:
                self.call(self.server.stop(grace), timeout=grace + self.server.close_timeout * 4 + STOP_SLACK)
            finally:
                self._stopped = True
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
