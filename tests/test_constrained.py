"""Structured output on a real mesh (vision, two stages, coordinator over gRPC on 127.0.0.1): the
shipped shapes model cannot follow a JSON instruction, so every valid output below is the mask's
doing. Greedy and seeded outputs under a JSON schema parse, validate and finish with stop; JSON
object, regex and choice constraints hold; max_tokens cuts an output off with finish length; a
constrained and a free request in one batch each equal what they give alone, and a constraint that
does not compile fails its request alone with INVALID_ARGUMENT; kill -9 of the sampling replica in
the middle of a constrained output (real processes) changes nothing. Through the OpenAI gateway
(`vlmesh up`, the real `openai` SDK): response_format and vLLM's structured_outputs, streamed as
not, and a 400 for a constraint that does not compile."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator

import grpc
import jsonschema
import openai
import pytest
from meshutil import start_mesh, to_proto, vlmesh_up
from procmesh import ProcMesh

from services.cli import DEMO_IMAGE
from services.shapes import SHIPPED_MODEL
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import tensor_pb2

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 12},
        "filled": {"type": "boolean"},
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["shape", "count", "filled", "colours"],
    "additionalProperties": False,
}
PICTURE = [
    {
        "role": "user",
        "content": [{"type": "image", "image": DEMO_IMAGE.read_bytes()}, {"type": "text", "text": "Describe the shape as JSON."}],
    }
]
QUESTION = [{"role": "user", "content": "What colour is the circle?"}]


@pytest.fixture(scope="module")
def mesh():
    m = start_mesh(SHIPPED_MODEL, [(0, 2), (2, 4)])
    yield m
    m.stop()


def sampling(constraint: tensor_pb2.Constraint | None = None, **kw) -> tensor_pb2.SamplingParams:
    p = tensor_pb2.SamplingParams(**kw)
    if constraint is not None:
        p.constraint.CopyFrom(constraint)
    return p


SCHEMA_C = tensor_pb2.Constraint(json_schema=json.dumps(SCHEMA))


@pytest.mark.parametrize("kw", [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_schema_outputs_parse_validate_and_stop(mesh, kw):
    _, text, last = mesh.generate(PICTURE, sampling=sampling(SCHEMA_C, **kw), max_tokens=120)
    assert last.finish_reason == cpb.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert " " not in text  # compact: nothing but the value


def test_the_model_alone_does_not_write_json(mesh):
    """What the tests above assert is the constraint's doing: unconstrained, the answer is prose."""
    _, text, _ = mesh.generate(PICTURE, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_regex_and_choice_hold(mesh):
    _, text, last = mesh.generate(QUESTION, sampling=sampling(tensor_pb2.Constraint(json_object=True)), max_tokens=120)
    assert last.finish_reason == cpb.FINISH_REASON_STOP and isinstance(json.loads(text), dict), text
    pattern = r"(red|green|blue) [a-z]{3,8}, [0-9]{1,2}"
    for kw in ({}, {"temperature": 1.0, "seed": 9}):
        _, text, last = mesh.generate(QUESTION, sampling=sampling(tensor_pb2.Constraint(regex=pattern), **kw), max_tokens=40)
        assert last.finish_reason == cpb.FINISH_REASON_STOP and re.fullmatch(pattern, text), text
    options = ["a red circle", "a blue square", "no shape at all"]
    for kw in ({}, {"temperature": 1.0, "seed": 4}):
        choice = tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=options))
        _, text, last = mesh.generate(PICTURE, sampling=sampling(choice, **kw), max_tokens=40)
        assert last.finish_reason == cpb.FINISH_REASON_STOP and text in options


def test_max_tokens_cuts_a_constrained_output_off_with_length(mesh):
    full = mesh.generate(PICTURE, sampling=sampling(SCHEMA_C), max_tokens=120)
    cut = mesh.generate(PICTURE, sampling=sampling(SCHEMA_C), max_tokens=5)
    assert cut[2].finish_reason == cpb.FINISH_REASON_LENGTH
    assert cut[0] == full[0][:5]


def _together(mesh, requests: list[dict]) -> list[tuple[list[int], str, cpb.GenerateResponse] | grpc.RpcError]:
    """The requests at once (one batch on the stages), each result or its error, in order."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = mesh.generate(**requests[i])
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_constrained_and_free_in_one_batch_each_equal_alone_and_a_bad_constraint_fails_alone(mesh):
    constrained = {"messages": PICTURE, "sampling": sampling(SCHEMA_C, temperature=1.0, seed=5), "max_tokens": 120}
    free = {"messages": QUESTION, "max_tokens": 24}
    bad = {"messages": QUESTION, "sampling": sampling(tensor_pb2.Constraint(json_schema='{"type": "frobnicate"}')), "max_tokens": 24}
    alone = [mesh.generate(**constrained)[0], mesh.generate(**free)[0]]
    got = _together(mesh, [constrained, free, bad, free])
    assert [got[0][0], got[1][0], got[3][0]] == [alone[0], alone[1], alone[1]]
    err = got[2]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "frobnicate" in err.details()
    with pytest.raises(grpc.RpcError) as empty:
        mesh.generate(QUESTION, sampling=sampling(tensor_pb2.Constraint()), max_tokens=4)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in empty.value.details()


@pytest.mark.slow
def test_vlmesh_chat_json_schema_prints_valid_json(mesh, tmp_path):
    """`vlmesh chat --json-schema FILE`: the reply is JSON valid under FILE's schema."""
    import subprocess
    import sys

    schema = tmp_path / "shape.json"
    schema.write_text(json.dumps(SCHEMA))
    base = [sys.executable, "-m", "services.cli", "chat", "--address", mesh.address, "--max-tokens", "120"]
    done = subprocess.run(
        [*base, "--json-schema", str(schema), "--image", str(DEMO_IMAGE), "Describe the shape."], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)
    schema.write_text("[1, 2")
    bad = subprocess.run([*base, "--json-schema", str(schema), "hi"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--json-schema" in bad.stderr and "not JSON" in bad.stderr


def test_kill_9_of_the_sampling_replica_mid_output_finishes_with_the_same_json():
    """The constraint's state is a function of the generated tokens: the replica that takes over
    the last range rebuilds it from them and writes the same (seeded) text as the undisturbed run."""
    mesh = ProcMesh(str(SHIPPED_MODEL), [(0, 2), (2, 4)], replicas=2, coord_args=["--health-interval", "0.3", "--prefix-cache-sessions", "0"]).start()
    try:
        ch, stub = mesh.stub()
        with ch:
            request = cpb.GenerateRequest(messages=to_proto(PICTURE), sampling=sampling(SCHEMA_C, temperature=1.0, seed=21), max_tokens=120)
            undisturbed = [r for r in stub.Generate(request, timeout=120)]
            killed: list[str] = []
            ids: list[int] = []
            for r in stub.Generate(request, timeout=120):
                ids += list(r.token_ids)
                if len(ids) == 6 and not killed:
                    holder = next(s for s in mesh.status().stages if s.layers.end == 4 and s.pinned_sessions > 0)
                    killed.append(mesh.stage_name(holder.address))
                    mesh.kill(killed[0])
                last = r
        assert killed, "the output ended before the kill"
        assert ids == [t for r in undisturbed for t in r.token_ids] and last.finish_reason == cpb.FINISH_REASON_STOP
        jsonschema.validate(json.loads("".join(r.text for r in undisturbed)), SCHEMA)
    finally:
        mesh.stop()


# ---------------------------------------------------------------- the OpenAI gateway (real processes, the openai SDK)

MODEL_ID = SHIPPED_MODEL.name
IMAGE_URL = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
OPENAI_PICTURE = [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": "Describe the shape as JSON."}]}
]


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with vlmesh_up(SHIPPED_MODEL, tmp_path_factory.mktemp("constrained-logs"), "--openai-port", "0") as addresses:
        yield openai.OpenAI(base_url=addresses["openai"] + "/v1", api_key="sk-unused", max_retries=0, timeout=120)


def _streamed(sdk: openai.OpenAI, **kw) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in sdk.chat.completions.create(model=MODEL_ID, messages=OPENAI_PICTURE, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("sampling_kw", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_gateway_json_schema_validates_and_streams_the_same_text(sdk, sampling_kw):
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    got = sdk.chat.completions.create(model=MODEL_ID, messages=OPENAI_PICTURE, response_format=fmt, max_tokens=120, **sampling_kw)
    text = got.choices[0].message.content
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    assert _streamed(sdk, response_format=fmt, max_tokens=120, **sampling_kw) == (text, "stop")


def test_gateway_json_object_and_vllm_structured_outputs(sdk):
    got = sdk.chat.completions.create(model=MODEL_ID, messages=OPENAI_PICTURE, response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    assert got.choices[0].finish_reason == "stop" and isinstance(json.loads(got.choices[0].message.content), dict)
    pattern = r"(red|green|blue) [a-z]{3,8}, [0-9]{1,2}"
    got = sdk.chat.completions.create(
        model=MODEL_ID, messages=OPENAI_PICTURE, max_tokens=40, temperature=0, extra_body={"structured_outputs": {"regex": pattern}}
    )
    assert re.fullmatch(pattern, got.choices[0].message.content)
    options = ["a red circle", "a blue square"]
    got = sdk.chat.completions.create(
        model=MODEL_ID, messages=OPENAI_PICTURE, max_tokens=40, temperature=1.0, seed=2, extra_body={"structured_outputs": {"choice": options}}
    )
    assert got.choices[0].message.content in options
    got = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=OPENAI_PICTURE,
        max_tokens=40,
        temperature=0,
        extra_body={"structured_outputs": {"grammar": 'start: "shape: " ("circle" | "square")'}},
    )
    assert got.choices[0].message.content in ("shape: circle", "shape: square")
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    cut = sdk.chat.completions.create(model=MODEL_ID, messages=OPENAI_PICTURE, response_format=fmt, max_tokens=3, temperature=0)
    assert cut.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}, "frobnicate"),
        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "regex"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "exactly one"),
    ],
)
def test_gateway_refuses_a_bad_constraint_with_400(sdk, kw, needle):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as bad:
            result = sdk.chat.completions.create(model=MODEL_ID, messages=OPENAI_PICTURE, max_tokens=8, stream=stream, **kw)
            if stream:
                list(result)
        assert needle in str(bad.value)
