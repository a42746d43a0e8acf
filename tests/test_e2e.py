"""End to end with real processes: `vlmesh up` starts the mesh, `vlmesh chat` and the client
library talk to it, SIGTERM stops every child; a stage's memory follows its share of layers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from meshutil import images_of, reference

from vlmesh import Client

VLMESH = [sys.executable, "-m", "services.cli"]


@pytest.fixture(scope="module")
def up(tiny_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    proc = subprocess.Popen(
        [*VLMESH, "up", "--model", str(tiny_models["a"]), "--stages", "2", "--port", "0", "--log-dir", str(logs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"vlmesh up exited: {proc.stderr.read()}")
    addresses = json.loads(line)
    yield proc, addresses
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_up_serves_cli_and_client_like_generate(up, tiny_models, images, tmp_path):
    proc, addresses = up
    image = tmp_path / "img.png"
    image.write_bytes(images["wide"])
    messages = [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What is this?"}]}]
    ref = reference(tiny_models["a"])
    expected, _ = ref.generate_ids(ref.prompt_ids(messages), images_of(messages), 8)

    with Client(addresses["coordinator"]) as client:
        result = client.chat([{**messages[0], "content": [{"type": "image", "image": str(image)}, messages[0]["content"][1]]}], max_tokens=8)
    assert result.token_ids == expected

    out = subprocess.run(
        [*VLMESH, "chat", "--address", addresses["coordinator"], "--image", str(image), "--max-tokens", "8", "What is this?"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == result.text


def test_sigterm_stops_every_child(up):
    proc, _ = up
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == 4  # vision, two stages, coordinator
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []


def test_stage_memory_scales_with_its_layers(tmp_path):
    """Each stage reads only its own tensors: 1 of 8 layers vs all 8 differ by ~7 layers of
    weights in resident memory. Weights are memory-mapped, so one step runs first to touch them."""
    import grpc
    import torch

    from services.common import tensors
    from services.common.channels import wait_healthy
    from services.launcher import free_port
    from services.tiny import make_tiny
    from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

    model = make_tiny(tmp_path / "wide", num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=2048)
    layer_bytes = 4 * (512 * 512 * 2 + 2 * (512 * 128 + 128) + 512 + 3 * 512 * 2048 + 2 * 512)  # fp32
    rss = {}
    for layers in ("0:1", "0:8"):
        port = free_port()
        args = ["serve", "stage", "--model", str(model), "--layers", layers, "--port", str(port), "--insecure"]
        p = subprocess.Popen([*VLMESH, *args])
        try:
            wait_healthy(f"127.0.0.1:{port}", timeout=120)
            step = stage_pb2.StepInput(
                session_id="s",
                tokens=stage_pb2.TokenIds(ids=[1, 2, 3]),
                position_ids=tensors.to_proto(torch.arange(3).expand(3, 3).contiguous()),
            )
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                out = list(stage_pb2_grpc.StageServiceStub(ch).Forward(iter([stage_pb2.ForwardRequest(steps=[step])])))
            assert out[0].outputs[0].status.code == 0
            rss[layers] = psutil.Process(p.pid).memory_info().rss
        finally:
            p.terminate()
            p.wait(30)
    grown = rss["0:8"] - rss["0:1"]
    assert 0.8 * 7 * layer_bytes < grown < 1.5 * 7 * layer_bytes, (grown, layer_bytes)


def test_generated_protos_are_fresh():
    root = os.path.dirname(os.path.dirname(__file__))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "gen_protos.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
