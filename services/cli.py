"""The `vlmesh` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

DEMO_IMAGE = Path(__file__).parent / "assets" / "demo.png"  # data.demo_scene(), rendered
DEFAULT_TINY = Path(os.environ.get("VLMESH_HOME", Path.home() / ".cache" / "vlmesh")) / "tiny-qwen2-vl"


SERVICES = ("vision", "stage", "coordinator", "gateway")
SERVE_USAGE = """usage: vlmesh serve {vision,stage,coordinator,gateway} [options]

Run one service of the mesh (one process; every flag also reads VLMESH_<FLAG> from the environment):
  vision        the vision encoder
  stage         a contiguous range of decoder layers and the KV cache of its sessions
  coordinator   the public API: sessions, the step loop, sampling
  gateway       an OpenAI-compatible HTTP API in front of a coordinator

`vlmesh serve SERVICE --help` lists a service's options."""


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


class StartFailed(Exception):
    """A service did not come up: printed as one line, exit status 1."""


def _service_config(service: str) -> type:
    if service == "vision":
        from services.vision.server import VisionConfig

        return VisionConfig
    if service == "stage":
        from services.stage.server import StageConfig

        return StageConfig
    from services.coordinator.server import CoordinatorConfig

    return CoordinatorConfig


def _check_model(model: str) -> None:
    if not (Path(model) / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json there (a checkpoint directory in the Hugging Face layout is needed)")


def _serve_precheck(service: str, argv: list[str]) -> None:
    """What can be told before a service spends minutes loading: its model directory exists and
    its ports are free (gRPC's SO_REUSEPORT would otherwise share a taken port silently)."""
    import dataclasses

    from services.common.ports import ensure_free

    fields = {f.name: f for f in dataclasses.fields(_service_config(service))}
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    names = [n for n in fields if n in ("model", "host") or n == "port" or n.endswith("_port")]
    for name in names:
        f = fields[name]
        default = os.environ.get("VLMESH_" + name.upper(), None if f.default is dataclasses.MISSING else f.default)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default)
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "model", None):
        _check_model(known.model)
    host = str(getattr(known, "host", None) or "0.0.0.0")
    for name in names:
        if name == "port" or name.endswith("_port"):
            try:
                port = int(getattr(known, name))
            except (TypeError, ValueError):
                continue  # the service's own parser reports it
            try:
                ensure_free(host, port)
            except OSError as e:
                raise UserError(f"--{name.replace('_', '-')}: {e}") from None


def _serve(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(SERVE_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in SERVICES:
        print(f"vlmesh serve: error: unknown service {argv[0]!r} (choose {', '.join(SERVICES)})", file=sys.stderr)
        return 2
    service, rest = argv[0], argv[1:]
    try:
        if not {"-h", "--help"} & set(rest):
            _serve_precheck(service, rest)
        if service == "vision":
            from services.vision.server import main
        elif service == "stage":
            from services.stage.server import main
        elif service == "gateway":
            from services.gateway.server import main
        else:
            from services.coordinator.server import main
        return main(rest)
    except UserError as e:
        print(f"vlmesh serve {service}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmesh serve {service}: interrupted", file=sys.stderr)
        return 130


def _default_model(model: str | None) -> str:
    """--model, else the shipped shapes model (trained offline, answers right about shapes
    pictures), else a tiny random-weight model written on first use."""
    if model:
        return model
    from services.shapes import SHIPPED_MODEL

    if (SHIPPED_MODEL / "config.json").exists():
        return str(SHIPPED_MODEL)
    if not (DEFAULT_TINY / "config.json").exists():
        from services.tiny import make_tiny

        print(f"no --model given and no shipped model: writing a tiny random-weight Qwen2-VL to {DEFAULT_TINY}", file=sys.stderr)
        make_tiny(DEFAULT_TINY)
    return str(DEFAULT_TINY)


def _ranges(args: argparse.Namespace, model: str) -> list[tuple[int, int]]:
    """--layers as given, --plan's balanced split of --stages, or an even split of --stages."""
    from services.common.checkpoint import load_config
    from services.launcher import parse_layers, split_layers

    try:
        config = load_config(model)
        layers = config.get_text_config().num_hidden_layers
        if args.layers:
            return parse_layers(args.layers, layers)
        if args.plan:
            import torch

            from services.plan import plan

            dtype = None if args.dtype in (None, "auto") else getattr(torch, args.dtype)
            return [(s.start, s.end) for s in plan(config, args.stages, dtype)]
        return split_layers(layers, args.stages)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def _service_args(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]]]:
    """The flags `vlmesh up` passes on: (to every service, to each kind of service). Flags not
    given are not passed, so the children still read their VLMESH_* environment."""

    def flag(name: str) -> list[str]:
        value = getattr(args, name, None)
        return [] if value is None else ["--" + name.replace("_", "-"), str(value)]

    common = [*flag("threads"), *flag("trace_exporter"), *flag("otlp_endpoint")]
    return common, {"vision": flag("dtype"), "stage": [*flag("dtype"), *flag("kv_budget_mb"), *flag("numerics")]}


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _start_mesh(mesh, timeout: float) -> None:
    """Start the mesh; Ctrl-C or SIGTERM during start-up stops it (start() raises
    KeyboardInterrupt at its next poll: see LocalMesh.cancel for why the handler only sets it)."""
    previous = {sig: signal.signal(sig, lambda *_: mesh.cancel.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        mesh.start(timeout=timeout)
    except OSError as e:  # PortInUse: nothing was started
        raise UserError(str(e)) from None
    except (RuntimeError, TimeoutError) as e:
        raise StartFailed(str(e)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fixed_or_free(given: int | None, default: int, coordinator_port: int) -> int:
    """A service's port: as given, else its fixed default, else (`--port 0`) any free one."""
    if given is not None:
        return given
    return 0 if coordinator_port == 0 else default


def _up(args: argparse.Namespace) -> int:
    from services.launcher import STAGE_PORT, VISION_PORT, LocalMesh, status_path
    from services.stage.quant import per_stage

    model = _default_model(args.model)
    _check_model(model)
    ranges = _ranges(args, model)
    try:
        quantize = per_stage(args.quantize, len(ranges))
    except ValueError as e:
        raise UserError(f"--quantize: {e}") from None
    common, per_service = _service_args(args)
    mesh = LocalMesh(
        model,
        ranges,
        port=args.port,
        log_dir=args.log_dir,
        host=args.host,
        replicas=args.replicas,
        stage_port=_fixed_or_free(args.stage_port, STAGE_PORT, args.port),
        vision_port=_fixed_or_free(args.vision_port, VISION_PORT, args.port),
        metrics_port=args.metrics_port,
        extra_args=common,
        service_args=per_service,
        progress=_progress,
        openai_port=args.openai_port,
        quantize=quantize,
        pipeline=args.pipeline,
    )
    try:
        mesh.check_ports()  # every port it will bind, before anything loads
    except OSError as e:
        raise UserError(str(e)) from None
    shown = ", ".join(f"{a}:{b}" for a, b in ranges) + (f", {args.replicas} replicas each" if args.replicas > 1 else "")
    print(f"starting vision + {len(ranges)} stage(s) ({shown}) + coordinator for {model}", file=sys.stderr)
    _start_mesh(mesh, args.timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        mesh.status_file = str(status_path(int(mesh.address.rsplit(":", 1)[1])))
        mesh.write_status()
        addresses = {
            "coordinator": mesh.address,
            "vision": mesh.vision_address,
            "stages": mesh.stage_addresses,
            "certs": mesh.certs,
            "state": mesh.state_dir,
            "status": mesh.status_file,
        }
        if mesh.openai_url:
            addresses["openai"] = mesh.openai_url
        print(json.dumps(addresses))
        openai = f", OpenAI API at {mesh.openai_url}" if mesh.openai_url else ""
        print(f"mesh ready: coordinator at {mesh.address}{openai} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Supervise until Ctrl-C / SIGTERM: a child that exits is restarted, never the mesh stopped.
        while not stop.wait(0.5):
            for line in mesh.supervise():
                print(f"vlmesh up: {line}", file=sys.stderr, flush=True)
        return 0
    finally:
        t0 = time.monotonic()
        mesh.stop()
        print(f"mesh stopped ({time.monotonic() - t0:.1f} s)", file=sys.stderr)


def _check_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"--image {path}: not an image this can read ({e})") from None


def _demo(args: argparse.Namespace) -> int:
    from services.launcher import LocalMesh
    from services.shapes import data
    from vlmesh import Client

    image = args.image or str(DEMO_IMAGE)
    _check_image(image)
    model = _default_model(args.model)
    _check_model(model)
    ranges = _ranges(argparse.Namespace(layers=None, plan=False, stages=args.stages), model)
    # Logs of a demo that answered are removed with it; a failed start keeps them (its error names the log).
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="vlmesh-demo-")
    print(f"starting vision + {len(ranges)} stages + coordinator for {model} (logs in {log_dir})", file=sys.stderr)
    mesh = LocalMesh(model, ranges, log_dir=log_dir, progress=_progress)
    _start_mesh(mesh, args.timeout)
    if not args.log_dir:
        mesh.remove_at_stop(log_dir)
    try:
        print(f"mesh up at {mesh.address}; asking about {image}", file=sys.stderr)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        with Client(mesh.address) as client:
            for delta in client.stream(messages, max_tokens=args.max_tokens):
                print(delta, end="", flush=True)
        print()
    finally:
        mesh.stop()
    if not args.image and args.question in data.CAPTION_QUESTIONS:
        print(f"(the picture shows {data.demo_scene().caption()})", file=sys.stderr)
    return 0


def _add_up_arguments(up: argparse.ArgumentParser) -> None:
    from services.launcher import COORDINATOR_PORT, STAGE_PORT, VISION_PORT

    up.add_argument("--model", help="checkpoint directory (default: the shipped shapes model)")
    split = up.add_mutually_exclusive_group()
    split.add_argument("--layers", metavar="A:B,B:C,...", help="the stages' layer ranges, e.g. 0:14,14:28 (sets the stage count)")
    split.add_argument("--plan", action="store_true", help="split --stages the way `vlmesh plan` balances memory (default: even layer counts)")
    up.add_argument("--stages", type=int, default=2, help="number of transformer stages (without --layers)")
    up.add_argument("--replicas", type=int, default=1, help="stage processes per layer range (the coordinator gets every address)")
    up.add_argument("--host", default="127.0.0.1", help="address every service binds (0.0.0.0: all interfaces)")
    up.add_argument("--port", type=int, default=COORDINATOR_PORT, help="coordinator port (0: every service on any free port)")
    up.add_argument(
        "--stage-port",
        type=int,
        default=None,
        help=f"the first stage process's port, the others counting up from it (default {STAGE_PORT}; 0: any free ports)",
    )
    up.add_argument("--vision-port", type=int, default=None, help=f"the vision service's port (default {VISION_PORT}; 0: any free port)")
    up.add_argument("--metrics-port", type=int, default=None, help="serve the coordinator's Prometheus metrics on this HTTP port")
    up.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="vision and stage parameter dtype")
    up.add_argument("--kv-budget-mb", type=int, help="each stage's KV cache budget in MiB")
    up.add_argument(
        "--numerics",
        choices=("exact", "fast"),
        help="stages' attention: exact (the default: equal to generate()) or fast (one batched call per layer)",
    )
    up.add_argument("--threads", type=int, help="torch threads per service (0 = torch's default)")
    up.add_argument("--trace-exporter", choices=("none", "console", "otlp"), help="where every service sends its spans")
    up.add_argument("--otlp-endpoint", help="OTLP gRPC collector for --trace-exporter otlp, e.g. http://127.0.0.1:4317")
    up.add_argument("--log-dir", help="write each service's log here instead of the terminal, and keep the coordinator's sessions in LOG_DIR/state")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the services to be healthy")
    up.add_argument("--openai-port", type=int, default=None, help="also start the OpenAI-compatible gateway on this port (0 = any free one)")
    up.add_argument(
        "--pipeline", action="store_true", help="keep one micro-batch in flight per stage (off here: local stages share the machine's cores)"
    )
    up.add_argument(
        "--quantize", default="auto", help="stages' decoder-layer linears: auto, int8 or none, or a comma list with one per stage (e.g. int8,none)"
    )


def _run_guarded(name: str, fn, args: argparse.Namespace) -> int:
    """A user's mistake or an interrupted start-up is one line on stderr, never a traceback."""
    try:
        return fn(args)
    except UserError as e:
        print(f"vlmesh {name}: error: {e}", file=sys.stderr)
        return 2
    except StartFailed as e:
        print(f"vlmesh {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlmesh {name}: interrupted; every service it started is stopped", file=sys.stderr)
        return 130


# Every command, its one-line help, and where its arguments and run() live ("" for the ones here).
# Only the command asked for is imported, so one that needs no model loads no torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("run one service: vlmesh serve {vision,stage,coordinator,gateway} --help", ""),
    "up": ("run the whole mesh locally as child processes, restarting any that exits", ""),
    "demo": ("start a mesh, ask about an image, print the streamed answer, stop", ""),
    "chat": ("chat with a running mesh (one-shot or interactive)", "vlmesh.chat_cli"),
    "plan": ("split a model's layers over N stages, balancing memory (config only)", "services.plan"),
    "eval": ("score a checkpoint on held-out shapes questions (transformers and mesh)", "services.shapes.eval"),
    "make-tiny": ("write a tiny random-weight checkpoint in the HF layout", "services.tiny"),
    "status": ("print the running mesh: replicas, health, KV use, sessions, vision cache; and what `vlmesh up` restarted", ""),
    "certs": ("make a CA and certificates for the mesh's mutual TLS", "services.common.certs"),
    "keys": ("make API keys for the coordinator's --api-keys-file", "services.coordinator.auth"),
    "quantize": ("SmoothQuant-calibrate a checkpoint, write it as compressed-tensors W8A8", "services.quantize"),
}


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--model", help="checkpoint directory (default: the shipped shapes model)")
    demo.add_argument("--stages", type=int, default=2)
    demo.add_argument("--image", help="image to ask about (default: the shipped example)")
    demo.add_argument("--question", default="What is in this picture?")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--log-dir", help="write each service's log here and keep it (default: a temp dir removed after the answer)")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the services to be healthy")


def _add_status_arguments(p: argparse.ArgumentParser) -> None:
    from services import status

    status.add_arguments(p)


def _status(args: argparse.Namespace) -> int:
    """The coordinator's view, then, for a mesh `vlmesh up` runs on this machine, its supervisor's
    (the children, their restarts and its last events: from the file status_path(port) names)."""
    from services import status
    from services.launcher import read_status

    rc = status.run(args)
    host, _, port = args.coordinator.rpartition(":")
    sup = read_status(int(port)) if port.isdigit() and host in ("127.0.0.1", "localhost", "0.0.0.0", "[::1]", "") else None
    if sup is None or args.json:
        return rc
    print(f"\nvlmesh up (pid {sup['pid']}), state in {sup['state_dir']}:")
    for c in sup["children"]:
        restarts = f", {c['restarts']} restart(s)" if c["restarts"] else ""
        print(f"  {c['name']:<12} {c['address']:<22} {c['state']}{restarts}")
    for line in sup["events"][-10:]:
        print(f"  {line}")
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vlmesh", description="Qwen vision-language models as a gRPC mesh.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parsers = {name: sub.add_parser(name, help=text) for name, (text, _) in COMMANDS.items()}
    module = None
    if cmd in COMMANDS:
        p, where = parsers[cmd], COMMANDS[cmd][1]
        if cmd == "up":
            _add_up_arguments(p)
        elif cmd == "demo":
            _add_demo_arguments(p)
        elif cmd == "status":
            _add_status_arguments(p)
        elif where:
            import importlib

            module = importlib.import_module(where)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.cmd == "up":
        if args.replicas < 1:
            parser.error("--replicas must be at least 1")
        return _run_guarded("up", _up, args)
    if args.cmd == "demo":
        return _run_guarded("demo", _demo, args)
    if args.cmd == "status":
        return _status(args)
    if module is not None:
        return module.run(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
