"""`vlmesh chat`: talk to a coordinator from the terminal.

One-shot (a prompt argument) streams one answer; without a prompt it runs an interactive
multi-turn session. The main `vlmesh` CLI calls `add_arguments` and `run`; `main` runs the
subcommand on its own (``python -m vlmesh.chat_cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from ._messages import load_image, load_video
from .client import API_KEY_ENV, DEFAULT_ADDRESS, Client, GenerateOptions, Session
from .errors import NotFound, VlmeshError

__all__ = ["add_arguments", "run", "main"]

_HELP = "commands: /image PATH, /video PATH (attach to next message), /reset (new session), /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `vlmesh chat` arguments to `parser`."""
    parser.add_argument(
        "prompt",
        nargs="?",
        help="ask this and exit ('-' reads it from stdin); without it, chat interactively",
    )
    parser.add_argument(
        "--address",
        "--coordinator",
        dest="address",
        default=None,
        help=f"coordinator address (default: $VLMESH_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"API key, sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (system root certificates)")
    parser.add_argument("--ca-cert", metavar="FILE", default=None, help="verify the coordinator against this CA (PEM); implies --tls")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let image/video URLs name loopback, private and link-local addresses (refused by default)",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="attach an image (path or URL) to the (first) message; repeatable",
    )
    parser.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="attach a video file (MP4, MOV, M4V, AVI; path or URL) to the (first) message, after the images; repeatable",
    )
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string; repeatable")
    parser.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="every reply is JSON valid under the JSON Schema in FILE (enforced while decoding)",
    )


def _options(args: argparse.Namespace) -> GenerateOptions:
    options: GenerateOptions = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": list(args.stop or []),
    }
    schema = getattr(args, "schema", None)
    if schema is not None:
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    return options


def _schema(path: str | None) -> dict[str, Any] | None:
    """The JSON Schema in `path`. ValueError: unreadable, not JSON, or not an object."""
    if path is None:
        return None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read --json-schema {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"--json-schema {path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema {path} must hold a JSON object (a schema)")
    return schema


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _report(exc: Exception) -> None:
    if isinstance(exc, VlmeshError):
        hint = ""
        if exc.code is grpc.StatusCode.UNAVAILABLE and "connect" in exc.details:
            hint = "\n  no mesh answers there: start one with `vlmesh up`, or point --address at a running coordinator"
        _error(f"{exc.code.name}: {exc.details}{hint}")
    else:
        # Local validation (bad image, bad option): the same class of failure the server
        # would report as INVALID_ARGUMENT, so scripts can parse one format.
        _error(f"INVALID_ARGUMENT: {exc}")


def _turn(system: str | None, parts: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = list(parts)
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


class _Printer:
    """Writes deltas as they come and remembers whether a line is open (a newline is owed)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.open_line = False

    def stream(self, deltas: Iterable[str]) -> None:
        for delta in deltas:
            self.out.write(delta)
            self.out.flush()
            self.open_line = True

    def end_line(self) -> None:
        if self.open_line:
            self.out.write("\n")
        self.out.flush()
        self.open_line = False


def _one_shot(client: Client, args: argparse.Namespace, images: list[dict[str, Any]]) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    printer = _Printer(sys.stdout)
    try:
        printer.stream(client.stream(_turn(args.system, images, prompt), **_options(args)))
    except (VlmeshError, ValueError) as e:
        printer.end_line()
        _report(e)
        return 1
    except KeyboardInterrupt:
        printer.end_line()
        return 130
    # The answer always ends with a newline, even when it is empty.
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def _close_quietly(session: Session | None) -> None:
    if session is not None:
        # The server frees abandoned sessions eventually; nothing more to do here on failure.
        with contextlib.suppress(VlmeshError):
            session.close()


@dataclass
class _Conversation:
    """What the interactive loop carries between lines."""

    session: Session | None = None
    send_system: bool = True  # the system prompt goes with the first turn of each session
    pending: list[dict[str, Any]] = field(default_factory=list)  # images and videos for the next message


def _slash(client: Client, conv: _Conversation, text: str) -> bool:
    """A /command; True when it ends the chat."""
    command, _, rest = text.partition(" ")
    if command == "/quit":
        return True
    if command == "/reset":
        _close_quietly(conv.session)
        conv.session, conv.send_system, conv.pending = None, True, []
        print("(new session)", file=sys.stderr)
    elif command in ("/image", "/video"):
        kind = command[1:]
        try:
            load = load_image if kind == "image" else load_video
            data = load(rest.strip(), allow_private_urls=client.allow_private_urls)
            conv.pending.append({"type": kind, kind: data})
            print(f"({kind} attached: {rest.strip()})", file=sys.stderr)
        except ValueError as e:
            _report(e)
    else:
        _error(f"unknown command {command!r}; {_HELP}")
    return False


def _say(client: Client, args: argparse.Namespace, conv: _Conversation, text: str) -> None:
    """One turn: stream the reply, or report why there is none."""
    printer = _Printer(sys.stdout)
    try:
        if conv.session is None:
            conv.session = client.session()
        messages = _turn(args.system if conv.send_system else None, conv.pending, text)
        printer.stream(conv.session.stream(messages, **_options(args)))
        conv.send_system, conv.pending = False, []
    except (VlmeshError, ValueError) as e:
        printer.end_line()
        _report(e)
        if isinstance(e, NotFound) and conv.session is not None:
            # The server dropped the session (evicted, restarted): start over.
            print("(session lost; the next message starts a new session)", file=sys.stderr)
            conv.session, conv.send_system = None, True
    except KeyboardInterrupt:
        if conv.session is not None:
            # The turn reached the server, which may keep part of it: don't resend it.
            conv.send_system, conv.pending = False, []
        printer.end_line()
        print("(interrupted)", file=sys.stderr)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _interactive(client: Client, args: argparse.Namespace, images: list[dict[str, Any]]) -> int:
    tty = sys.stdin.isatty()
    if tty:
        print(_HELP, file=sys.stderr)
    conv = _Conversation(pending=list(images))  # --image goes with the first message
    try:
        while True:
            try:
                line = _read_line(tty)
            except KeyboardInterrupt:
                print()
                return 130
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if _slash(client, conv, text):
                    return 0
                continue
            _say(client, args, conv, text)
    finally:
        _close_quietly(conv.session)


def run(args: argparse.Namespace) -> int:
    """Run `vlmesh chat` with parsed `args`; returns the exit status."""
    address = args.address or os.environ.get("VLMESH_ADDRESS") or DEFAULT_ADDRESS
    allow = bool(args.allow_private_urls)
    try:
        args.schema = _schema(getattr(args, "json_schema", None))
        images = [{"type": "image", "image": load_image(path, allow_private_urls=allow)} for path in args.image or []]
        images += [{"type": "video", "video": load_video(path, allow_private_urls=allow)} for path in getattr(args, "video", None) or []]
        client = Client(
            address,
            api_key=args.api_key,
            tls=bool(args.tls),
            root_certificates=args.ca_cert,
            allow_private_urls=allow,
        )
    except ValueError as e:
        _report(e)
        return 1
    with client:
        if args.prompt is not None:
            return _one_shot(client, args, images)
        return _interactive(client, args, images)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m vlmesh.chat_cli [options] [prompt]``."""
    parser = argparse.ArgumentParser(prog="vlmesh chat", description="Chat with a vlmesh coordinator.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
