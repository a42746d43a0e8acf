"""The `vlmesh` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

DEMO_IMAGE = Path(__file__).parent / "assets" / "demo.png"  # data.demo_scene(), rendered
DEFAULT_TINY = Path(os.environ.get("VLMESH_HOME", Path.home() / ".cache" / "vlmesh")) / "tiny-qwen2-vl"


def _serve(argv: list[str]) -> int:
    if not argv or argv[0] not in ("vision", "stage", "coordinator"):
        print("usage: vlmesh serve {vision,stage,coordinator} [options]  (-h after the service for its options)", file=sys.stderr)
        return 2
    service, rest = argv[0], argv[1:]
    if service == "vision":
        from services.vision.server import main
    elif service == "stage":
        from services.stage.server import main
    else:
        from services.coordinator.server import main
    return main(rest)


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


def _up(args: argparse.Namespace) -> int:
    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers
    from services.stage.quant import per_stage

    model = _default_model(args.model)
    layers = open_checkpoint(model).text_config.num_hidden_layers
    ranges = split_layers(layers, args.stages)
    try:
        quantize = per_stage(args.quantize, len(ranges))
    except ValueError as e:
        print(f"up: error: {e}", file=sys.stderr)
        return 2
    print(f"starting vision + {args.stages} stage(s) {ranges} + coordinator for {model}", file=sys.stderr)
    mesh = LocalMesh(model, ranges, port=args.port, log_dir=args.log_dir, quantize=quantize)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh.start(timeout=args.timeout)
    try:
        print(json.dumps({"coordinator": mesh.address, "vision": mesh.vision_address, "stages": mesh.stage_addresses}))
        print(f"mesh ready: coordinator at {mesh.address} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        while not stop.wait(0.5):
            dead = [p for p in mesh.procs if p.poll() is not None]
            if dead:
                print(f"a mesh process exited ({dead[0].returncode}); stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        mesh.stop()
        print("mesh stopped", file=sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from services.common.checkpoint import open_checkpoint
    from services.launcher import LocalMesh, split_layers
    from services.shapes import data
    from vlmesh import Client

    model = _default_model(args.model)
    image = args.image or str(DEMO_IMAGE)
    layers = open_checkpoint(model).text_config.num_hidden_layers
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="vlmesh-demo-")
    print(f"starting vision + {min(args.stages, layers)} stages + coordinator for {model} (logs in {log_dir})", file=sys.stderr)
    with LocalMesh(model, split_layers(layers, min(args.stages, layers)), log_dir=log_dir) as mesh:
        print(f"mesh up at {mesh.address}; asking about {image}", file=sys.stderr)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        with Client(mesh.address) as client:
            for delta in client.stream(messages, max_tokens=args.max_tokens):
                print(delta, end="", flush=True)
        print()
    if not args.image and args.question in data.CAPTION_QUESTIONS:
        print(f"(the picture shows {data.demo_scene().caption()})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vlmesh", description="Qwen vision-language models as a gRPC mesh.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run one service: vlmesh serve {vision,stage,coordinator} --help")

    up = sub.add_parser("up", help="run the whole mesh locally as child processes")
    up.add_argument("--model", help="checkpoint directory (default: the shipped shapes model)")
    up.add_argument("--stages", type=int, default=2, help="number of transformer stages")
    up.add_argument("--port", type=int, default=50051, help="coordinator port")
    up.add_argument("--log-dir", help="write each service's log here instead of the terminal")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for the services to be healthy")
    up.add_argument("--quantize", default="auto",
                    help="stages' decoder-layer linears: auto, int8 or none, or a comma list with one per stage (e.g. int8,none)")

    demo = sub.add_parser("demo", help="start a mesh, ask about an image, print the streamed answer, stop")
    demo.add_argument("--model", help="checkpoint directory (default: the shipped shapes model)")
    demo.add_argument("--stages", type=int, default=2)
    demo.add_argument("--image", help="image to ask about (default: the shipped example)")
    demo.add_argument("--question", default="What is in this picture?")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--log-dir", help="write each service's log here")

    from vlmesh import chat_cli

    chat_cli.add_arguments(sub.add_parser("chat", help="chat with a running mesh (one-shot or interactive)"))

    from services import plan as planner
    from services import quantize, tiny
    from services.shapes import eval as shapes_eval

    planner.add_arguments(sub.add_parser("plan", help="split a model's layers over N stages, balancing memory (config only)"))

    shapes_eval.add_arguments(sub.add_parser("eval", help="score a checkpoint on held-out shapes questions (transformers and mesh)"))

    tiny.add_arguments(sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the HF layout"))

    quantize.add_arguments(sub.add_parser("quantize", help="SmoothQuant-calibrate a checkpoint, write it as compressed-tensors W8A8"))

    args = parser.parse_args(argv)
    if args.cmd == "up":
        return _up(args)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "chat":
        return chat_cli.run(args)
    if args.cmd == "plan":
        return planner.run(args)
    if args.cmd == "eval":
        return shapes_eval.run(args)
    if args.cmd == "make-tiny":
        return tiny.run(args)
    if args.cmd == "quantize":
        return quantize.run(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
