"""Shutdown is idempotent and bounded: a second stop, or a SIGTERM during the drain, waits for
the first stop or returns, never deadlocks; the drain lasts at most its grace, and a part of the
shutdown that hangs costs its bound, not the process's exit.

Each server here keeps a grpc.health.v1 Watch stream open: an RPC that is in flight until the
drain's grace ends and gRPC cancels it, which is what a long generation does to a real drain."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from threaded_server import ThreadedServer

from services.common.config import ServiceConfig
from services.common.server import RunningServer, start_server
from services.launcher import free_port

GRACE = 1.0
# Far above what a stop needs on a loaded machine, far below a hang (pytest's timeout is 600 s):
# crossing it means a stop waited on something that never comes.
BOUND = GRACE + 30.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
GONE = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)  # what a client in flight sees at the end of a drain


async def serve(on_stop=None) -> RunningServer:
    return await start_server([], ServiceConfig(insecure=True, reflection=False), 0, internal=True, on_stop=on_stop)


class Watcher:
    """A Watch stream on another thread (its own blocking channel), recording what it sees."""

    def __init__(self, address: str):
        self.seen: list[int] = []
        self.ended: grpc.StatusCode | None = None
        self.serving, self.draining = threading.Event(), threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        assert self.serving.wait(BOUND), "the Watch stream never said SERVING"

    def _watch(self) -> None:
        try:
            for r in health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest()):
                self.seen.append(r.status)
                (self.serving if r.status == SERVING else self.draining).set()
        except grpc.RpcError as err:
            self.ended = err.code()
        finally:
            self.draining.set()

    def join(self) -> None:
        self._thread.join(BOUND)
        self._channel.close()
        assert not self._thread.is_alive(), "the in-flight stream outlived the drain"


def test_a_second_stop_during_the_drain_waits_for_the_first_and_runs_the_shutdown_once():
    async def main() -> None:
        stops = 0

        async def on_stop() -> None:
            nonlocal stops
            stops += 1

        running = await serve(on_stop)
        loop = asyncio.get_running_loop()
        watcher = await loop.run_in_executor(None, Watcher, running.address)
        first = asyncio.create_task(running.stop(GRACE))
        assert await loop.run_in_executor(None, watcher.draining.wait, BOUND)
        assert not first.done()  # the Watch stream holds the drain open until the grace ends
        await asyncio.wait_for(running.stop(0), BOUND)  # a second stop, mid-drain, with another grace
        assert running._stopping is not None and running._stopping.done() and stops == 1  # it waited for the first; nothing ran twice
        await asyncio.wait_for(running.stop(GRACE), BOUND)  # and a stop after the end returns
        assert stops == 1
        await loop.run_in_executor(None, watcher.join)
        assert watcher.seen == [SERVING, NOT_SERVING] and watcher.ended in GONE

    asyncio.run(main())


def test_a_caller_cancelled_mid_drain_leaves_the_stop_to_finish():
    async def main() -> None:
        done = asyncio.Event()

        async def on_stop() -> None:
            done.set()

        running = await serve(on_stop)
        loop = asyncio.get_running_loop()
        watcher = await loop.run_in_executor(None, Watcher, running.address)
        caller = asyncio.create_task(running.stop(GRACE))
        assert await loop.run_in_executor(None, watcher.draining.wait, BOUND)
        caller.cancel()  # e.g. the task that got SIGTERM is torn down
        await asyncio.wait_for(done.wait(), BOUND)
        await loop.run_in_executor(None, watcher.join)

    asyncio.run(main())


def test_a_shutdown_hook_that_hangs_or_fails_costs_its_bound_and_the_rest_still_stops():
    async def main() -> None:
        for hook in (asyncio.Event().wait, _fails):
            running = await serve(hook)
            running.close_timeout = 0.5
            await asyncio.wait_for(running.stop(0), BOUND)
            with grpc.insecure_channel(running.address) as ch:  # the port is closed
                try:
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    raise AssertionError("the server still answers after its stop")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


async def _fails() -> None:
    raise RuntimeError("a hook that breaks")


async def _start(cfg: ServiceConfig) -> RunningServer:
    return await serve()


def test_threaded_server_stopped_twice_from_two_threads_returns_from_both():
    """The hang in the health-port test: a cleanup stop while another thread's stop drained."""
    server = ThreadedServer(_start, ServiceConfig(insecure=True, reflection=False))
    watcher = Watcher(server.address)
    first = threading.Thread(target=server.stop, kwargs={"grace": GRACE}, daemon=True)  # daemon: a hung stop fails the test, not the run
    first.start()
    assert watcher.draining.wait(BOUND)
    second = threading.Thread(target=server.stop, daemon=True)
    second.start()
    second.join(BOUND)
    assert not second.is_alive(), "the second stop hung"
    assert not first.is_alive()  # it returned only once the first had ended
    watcher.join()
    server.stop()  # and once more, after both


def test_sigterm_during_the_drain_exits_within_the_grace(tiny_models):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "vision", "--model", str(tiny_models["a"]), "--port", str(port)]
        + ["--insecure", "--threads", "1", "--shutdown-grace", str(GRACE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # up once the port answers health checks
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        break
            except grpc.RpcError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the vision service did not start"
            time.sleep(0.2)
        watcher = Watcher(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert watcher.draining.wait(BOUND)
        proc.send_signal(signal.SIGTERM)  # during the drain: no second stop, no default action
        assert proc.wait(BOUND) == 0
        watcher.join()
        assert watcher.seen == [SERVING, NOT_SERVING] and watcher.ended in GONE
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out[-3000:]
