"""Operating the mesh from the CLI, as a user would (real processes): `vlmesh up` passes its flags
on to the services and shows start-up progress, `vlmesh serve --help` works, a port in use is an
error at once, and a user's mistake or Ctrl-C during start-up is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import psutil
import pytest
from otlp_sink import OtlpSink

from services.common.ports import PortInUse, ensure_free
from services.launcher import free_port, parse_layers
from vlmesh import Client

VLMESH = [sys.executable, "-m", "services.cli"]
SHAPES = Path(__file__).resolve().parent.parent / "services" / "assets" / "shapes-qwen2-vl"
DEMO_PNG = SHAPES.parent / "demo.png"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VLMESH, *args], check=False, capture_output=True, text=True, timeout=timeout)


def own_lines(stderr: str) -> list[str]:
    """stderr without what torch logs on import (e.g. `W1130 ... torch/utils/_pytree.py:630] ...`)."""
    return [line for line in stderr.splitlines() if line.strip() and "torch/" not in line]


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    lines = own_lines(out.stderr)
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def grpc_listener():
    """A gRPC server holding a port, as a running coordinator would: with SO_REUSEPORT."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


# --- ports ------------------------------------------------------------------------------------


def test_ensure_free_finds_a_grpc_listener_that_grpc_itself_would_share(grpc_listener):
    # The bug this guards against: a second gRPC server binds the same port without an error.
    second = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        assert second.add_insecure_port(f"127.0.0.1:{grpc_listener}") == grpc_listener
    finally:
        second.stop(0)
    with pytest.raises(PortInUse, match=str(grpc_listener)):
        ensure_free("127.0.0.1", grpc_listener)
    with pytest.raises(PortInUse, match=str(grpc_listener)):
        ensure_free("0.0.0.0", grpc_listener)


def test_ensure_free_passes_free_ports_and_port_zero():
    port = free_port()
    ensure_free("127.0.0.1", port)
    ensure_free("0.0.0.0", port)
    ensure_free("127.0.0.1", 0)
    # A port whose server just stopped (TIME_WAIT after a connection) is free again, as gRPC sees it.
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        closed = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", closed)):
            conn, _ = srv.accept()
            conn.close()
    ensure_free("127.0.0.1", closed)


def test_up_on_a_port_in_use_fails_at_once_naming_it(grpc_listener, tmp_path):
    out = run("up", "--port", str(grpc_listener), "--log-dir", str(tmp_path))
    assert_one_line_error(out, str(grpc_listener), "in use")
    assert out.returncode == 2
    assert list(tmp_path.iterdir()) == []  # nothing was started


@pytest.mark.parametrize("flag", ["--openai-port", "--stage-port", "--vision-port", "--metrics-port"])
def test_up_checks_every_port_before_loading(grpc_listener, flag, tmp_path):
    """Not only the coordinator's: the gateway's, every stage's, vision's and the metrics port are
    checked before anything is started (no model loads, nothing in the log directory)."""
    out = run("up", "--port", "0", flag, str(grpc_listener), "--log-dir", str(tmp_path))
    assert_one_line_error(out, str(grpc_listener), "in use", flag)
    assert out.returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_up_default_ports_are_the_readmes(tmp_path):
    """Without --port 0 the stages start at 50061 and vision is on 50071 (what the README's grpcurl
    lines name): a taken 50061 is refused at once, naming the flag that moves it."""
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 50061))
        except OSError:
            pytest.skip("port 50061 is in use on this machine")
        taken.listen()
        out = run("up", "--port", str(free_port()), "--log-dir", str(tmp_path))
    assert_one_line_error(out, "port 50061", "in use", "--stage-port 50061 + 0")
    assert list(tmp_path.iterdir()) == []


def test_commands_that_need_no_model_import_no_torch(tmp_path):
    code = (
        "import sys\nfrom services.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\nfinally:\n"
        "    print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    for argv in (
        ["keys", "new", "--name", "a", "--file", str(tmp_path / "keys.txt")],
        ["certs", "--out", str(tmp_path / "c")],
        ["up", "--help"],
        ["chat", "--help"],
        ["status", "--address", "127.0.0.1:1"],
    ):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert "heavy: []" in out.stdout, (argv, out.stdout, out.stderr)


def test_the_address_flag_has_one_name_on_every_command():
    out = run("status", "--address", "127.0.0.1:1")
    assert out.returncode == 1 and "127.0.0.1:1" in out.stderr, out.stderr
    out = run("status", "--coordinator", "127.0.0.1:1")
    assert out.returncode == 1 and "127.0.0.1:1" in out.stderr, out.stderr
    for flag in ("--address", "--coordinator"):
        out = run("chat", flag, "127.0.0.1:1", "hello", timeout=60)
        assert out.returncode == 1 and "unrecognized" not in out.stderr, out.stderr


def test_chat_with_no_mesh_says_what_to_do_and_a_text_file_is_no_image(tmp_path):
    out = run("chat", "--address", "127.0.0.1:1", "hello", timeout=60)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr and "vlmesh up" in out.stderr and "--address" in out.stderr, out.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    out = run("chat", "--address", "127.0.0.1:1", "--image", str(notes), "what is this?", timeout=60)
    assert out.returncode != 0 and "notes.txt" in out.stderr and "not a recognised image file" in out.stderr, out.stderr
    assert "BytesIO" not in out.stderr and " object at 0x" not in out.stderr


def test_serve_on_a_port_in_use_fails_before_loading(grpc_listener):
    out = run(
        "serve",
        "coordinator",
        "--model",
        str(SHAPES),
        "--stages",
        "127.0.0.1:1",
        "--vision",
        "127.0.0.1:1",
        "--host",
        "127.0.0.1",
        "--port",
        str(grpc_listener),
    )
    assert_one_line_error(out, f"--port: port {grpc_listener}", "in use")
    env = {**os.environ, "VLMESH_PORT": str(grpc_listener)}  # the environment form too
    out = subprocess.run(
        [*VLMESH, "serve", "stage", "--model", str(SHAPES), "--layers", "0:2", "--host", "127.0.0.1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert_one_line_error(out, str(grpc_listener), "in use")


# --- help and user mistakes -------------------------------------------------------------------


def test_serve_help_lists_the_services():
    out = run("serve", "--help")
    assert out.returncode == 0, out.stderr
    for service in ("vision", "stage", "coordinator"):
        assert service in out.stdout
    out = run("serve", "stage", "--help")
    assert out.returncode == 0 and "--kv-budget-mb" in out.stdout
    assert run("serve").returncode == 2
    assert_one_line_error(run("serve", "gateway-that-is-not"), "unknown service")


@pytest.mark.parametrize(
    "args, words",
    [
        (["up", "--model", "/no/such/model"], ["/no/such/model", "config.json"]),
        (["demo", "--model", "/no/such/model"], ["/no/such/model", "config.json"]),
        (["serve", "stage", "--model", "/no/such/model", "--layers", "0:1"], ["/no/such/model", "config.json"]),
        (["up", "--stages", "9"], ["4 layers", "9 stages"]),
        (["up", "--stages", "0"], ["0 stages"]),
        (["up", "--plan", "--stages", "5"], ["4 layers", "5 stages"]),
        (["up", "--layers", "0:3,2:4"], ["should start at layer 3"]),
        (["up", "--layers", "0:2"], ["4 decoder layers"]),
        (["up", "--layers", "0:2,2:9"], ["4 decoder layers"]),
        (["up", "--layers", "two"], ["START:END"]),
        (["demo", "--image", "/no/such.png"], ["no such file"]),
        (["demo", "--stages", "5"], ["cannot split 4 layers into 5 stages", "1 to 4"]),
        (["up", "--stages", "5"], ["cannot split 4 layers into 5 stages", "1 to 4"]),
    ],
)
def test_user_mistakes_are_one_line_and_nonzero(args, words, tmp_path):
    out = run(*args, "--log-dir", str(tmp_path)) if args[0] != "serve" else run(*args)
    assert_one_line_error(out, *words)
    assert out.returncode == 2
    if args[0] != "serve":
        assert list(tmp_path.iterdir()) == []  # no service was started


def test_demo_checks_the_image_before_starting_a_mesh(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    logs = tmp_path / "logs"
    out = run("demo", "--image", str(not_image), "--log-dir", str(logs))
    assert_one_line_error(out, str(not_image), "not an image")
    assert not logs.exists()


def test_demo_leaves_nothing_behind(tmp_path):
    """Its logs, the coordinator's session store and the throwaway certificates go with it."""
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(home)}
    out = subprocess.run([*VLMESH, "demo", "--max-tokens", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "A: " in out.stdout
    assert [p.name for p in tmp.iterdir() if p.name.startswith("vlmesh-")] == []
    assert not (home / ".local" / "state" / "vlmesh").exists()


def test_plan_flag_uses_the_balanced_split():
    from services.cli import _ranges
    from services.common.checkpoint import load_config
    from services.plan import plan

    args = argparse.Namespace(layers=None, plan=True, stages=3, dtype=None)
    planned = [(s.start, s.end) for s in plan(load_config(SHAPES), 3)]
    assert _ranges(args, str(SHAPES)) == planned == [(0, 1), (1, 3), (3, 4)]  # the embedding makes stage 0 heavy
    assert _ranges(argparse.Namespace(layers=None, plan=False, stages=3, dtype=None), str(SHAPES)) == [(0, 2), (2, 3), (3, 4)]
    assert parse_layers("0:1, 1:4", 4) == [(0, 1), (1, 4)]


def test_ctrl_c_during_startup_stops_everything(tmp_path):
    proc = subprocess.Popen([*VLMESH, "up", "--port", "0", "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(proc.pid).children()) < 3:  # vision and both stages are loading
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert own_lines(err)[-1] == "vlmesh up: interrupted; every service it started is stopped"
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []


# --- vlmesh up passes its flags on ------------------------------------------------------------


@pytest.fixture(scope="module")
def up_with_flags(tmp_path_factory):
    sink = OtlpSink().start()
    logs = tmp_path_factory.mktemp("up-logs")
    proc = subprocess.Popen(
        [
            *VLMESH,
            "up",
            "--port",
            "0",
            "--layers",
            "0:1,1:4",
            "--dtype",
            "float32",
            "--kv-budget-mb",
            "24",
            "--threads",
            "1",
            "--host",
            "127.0.0.1",
            "--trace-exporter",
            "otlp",
            "--otlp-endpoint",
            sink.endpoint,
            "--log-dir",
            str(logs),
            "--metrics-port",
            str(free_port()),
            "--numerics",
            "fast",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"vlmesh up exited: {proc.stderr.read()}")
    yield proc, json.loads(line), sink
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    sink.stop()


def test_up_flags_reach_the_services(up_with_flags):
    from meshutil import stage_info

    proc, addresses, sink = up_with_flags
    infos = [stage_info(addr, addresses["certs"]) for addr in addresses["stages"]]
    assert [(i.layer_start, i.layer_end) for i in infos] == [(0, 1), (1, 4)]
    assert {i.kv_budget_bytes for i in infos} == {24 << 20}
    assert {i.dtype for i in infos} == {"float32"}
    threads = {p.cmdline()[p.cmdline().index("--threads") + 1] for p in psutil.Process(proc.pid).children()}
    assert threads == {"1"}
    stages = [p.cmdline() for p in psutil.Process(proc.pid).children() if "stage" in p.cmdline()]
    assert len(stages) == 2 and all(c[c.index("--numerics") + 1] == "fast" for c in stages)
    coordinator = next(p.cmdline() for p in psutil.Process(proc.pid).children() if "coordinator" in p.cmdline())
    metrics_port = coordinator[coordinator.index("--metrics-port") + 1]
    assert coordinator[coordinator.index("--state-dir") + 1] == addresses["state"] == str(Path(proc.args[proc.args.index("--log-dir") + 1]) / "state")

    with Client(addresses["coordinator"]) as client:
        answer = client.chat(
            [{"role": "user", "content": [{"type": "image", "image": str(DEMO_PNG)}, {"type": "text", "text": "What is in this picture?"}]}],
            max_tokens=16,
        )
    assert answer.text
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:  # --metrics-port reached the coordinator
        assert "vlmesh:generation_tokens_total" in r.read().decode()
    # Every service exported its spans to the OTLP endpoint `vlmesh up` was given, each under its
    # own service.name (a stage's names its layer range).
    wanted = {"vlmesh-vision", "vlmesh-stage-0-1", "vlmesh-stage-1-4", "vlmesh-coordinator"}
    assert wanted <= sink.wait_for("service.name", wanted)


def test_up_shows_startup_progress(up_with_flags):
    proc, addresses, _ = up_with_flags
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    err = proc.stderr.read()
    for line in ("loading vision, stage 0:1, stage 1:4 (3 processes)", "ready 3/4: ", f"ready 4/4: coordinator at {addresses['coordinator']}"):
        assert line in err, err


@pytest.mark.slow
def test_up_replicas_start_every_stage_process_and_serve(tmp_path):
    """Needs the coordinator that groups replicas by the layer range each reports (today's
    coordinator refuses overlapping ranges)."""
    proc = subprocess.Popen(
        [*VLMESH, "up", "--port", "0", "--stages", "2", "--replicas", "2", "--threads", "1", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            pytest.fail(f"vlmesh up exited: {proc.stderr.read()}")
        addresses = json.loads(line)
        assert len(addresses["stages"]) == 4
        coordinator = next(p for p in psutil.Process(proc.pid).children() if "coordinator" in p.cmdline())
        cmd = coordinator.cmdline()
        assert cmd[cmd.index("--stages") + 1] == ",".join(addresses["stages"])
        with Client(addresses["coordinator"]) as client:
            assert client.chat(
                [{"role": "user", "content": [{"type": "image", "image": str(DEMO_PNG)}, {"type": "text", "text": "What is in this picture?"}]}],
                max_tokens=8,
            ).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
