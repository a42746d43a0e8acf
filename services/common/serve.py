"""`vlmesh serve X`: a service's process, from its config to its exit on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .config import ServiceConfig, add_config_arguments, config_from_args
from .logs import setup_logging

if TYPE_CHECKING:
    from .server import RunningServer

log = logging.getLogger(__name__)

StartFn = Callable[[Any], Coroutine[Any, Any, "RunningServer"]]


def prepare_process(service: str, cfg: ServiceConfig) -> None:
    """Tracing and torch threads, from a ServiceConfig."""
    from .tracing import setup_tracing

    setup_tracing(cfg.service_name or f"vlmesh-{service}", cfg.trace_exporter, cfg.otlp_endpoint)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


def serve_main(prog: str, description: str, config_cls: type, start: StartFn, argv: list[str] | None) -> int:
    """`vlmesh serve X`: config from flags and environment, logging, serve until SIGTERM. A
    user's mistake (a wrong path, a busy port, a bad flag value) is one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_cls)
    cfg: ServiceConfig = config_from_args(config_cls, parser.parse_args(argv))
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(_serve(cfg, start))
    except (ValueError, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve(cfg: ServiceConfig, start: StartFn) -> None:
    from .tracing import shutdown_tracing

    if cfg.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {cfg.shutdown_grace}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # A signal only sets the event: a second SIGTERM (or Ctrl-C) during the drain changes
    # nothing, and the one stop below ends within its bounds.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(cfg)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", cfg.shutdown_grace)
    await running.stop(cfg.shutdown_grace)
    shutdown_tracing()  # flush the last spans
