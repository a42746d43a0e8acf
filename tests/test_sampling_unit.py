"""vlmesh.sampling.SamplingOptions: one immutable value for a Generate call's options, checked when
made, with the coordinator's own rules, and the same on the wire as the request builder's."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from vlmesh.client import GenerateOptions, build_request
from vlmesh.sampling import MAX_LOGPROBS, SamplingOptions
from vlmesh.v1 import coordinator_pb2 as pb

# Option sets a caller writes; every value is exact in float32, so the wire carries it unchanged.
CASES: dict[str, dict[str, typing.Any]] = {
    "defaults": {},
    "greedy, bounded": dict(max_tokens=64, stop="\n\n"),
    "sampled": dict(temperature=0.75, top_k=40, top_p=0.5, repetition_penalty=1.25, seed=7),
    "seed 0 is a seed": dict(temperature=1.0, seed=0),
    "largest seed": dict(temperature=1.0, seed=2**64 - 1),
    "logprobs, stops, end token": dict(logprobs=MAX_LOGPROBS, stop=["END", "\n"], include_stop_token_text=True),
}


def _options_fields(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """The request without its conversation and session: what the options set."""
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    out.ClearField("messages")
    out.ClearField("session_id")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_to_proto_is_what_the_request_builder_sends(name):
    kw = CASES[name]
    assert SamplingOptions(**kw).to_proto() == _options_fields(build_request("hi", session_id="s", **kw))


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_through_the_proto(name):
    opts = SamplingOptions(**CASES[name])
    back = SamplingOptions.from_proto(opts.to_proto())
    assert back == opts and hash(back) == hash(opts)


def test_seed_unset_and_seed_zero_differ_on_the_wire():
    # Unset = the coordinator draws a seed; 0 is a seed like any other (same seed => same tokens).
    assert not SamplingOptions(temperature=1.0).to_proto().sampling.HasField("seed")
    zero = SamplingOptions(temperature=1.0, seed=0).to_proto()
    assert zero.sampling.HasField("seed") and zero.sampling.seed == 0
    assert SamplingOptions.from_proto(zero).seed == 0


def test_floats_hold_what_the_wire_carries():
    # float32 on the wire: the value keeps the float32 number, written shortest, so it survives
    # the round trip and compares equal to its own decoding.
    opts = SamplingOptions(temperature=0.7, top_p=0.123456789012)
    assert (opts.temperature, opts.top_p) == (0.7, 0.12345679)
    assert SamplingOptions.from_proto(opts.to_proto()) == opts
    assert SamplingOptions(temperature=0.1 + 0.2) == SamplingOptions(temperature=0.3)  # the same float32


def test_each_off_has_one_spelling():
    assert SamplingOptions(top_p=0.0) == SamplingOptions(top_p=1.0) == SamplingOptions()
    assert SamplingOptions(repetition_penalty=0.0) == SamplingOptions()
    assert SamplingOptions.from_proto(pb.GenerateRequest()) == SamplingOptions()  # max_tokens 0 = the default
    assert SamplingOptions(stop="a").stop == ("a",) and SamplingOptions(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingOptions().greedy and not SamplingOptions(temperature=0.5).greedy


def test_is_immutable():
    opts = SamplingOptions(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.temperature = 1.0  # type: ignore[misc]
    changed = dataclasses.replace(opts, top_k=5)  # a changed copy is checked like a new value
    assert (changed.temperature, changed.top_k, opts.top_k) == (0.5, 5, 0)
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(opts, top_k=-1)


BAD = [
    ("max_tokens", 0),
    ("max_tokens", 2**31),
    ("max_tokens", True),
    ("temperature", -0.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", 1e39),  # finite in Python, inf as float32
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", True),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("repetition_penalty", -0.1),
    ("repetition_penalty", math.inf),
    ("seed", -1),
    ("seed", 2**64),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", b"bytes"),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("include_stop_token_text", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_are_refused_naming_the_option(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingOptions(**{field: value})


def test_the_coordinator_accepts_what_passes_and_refuses_what_does_not():
    """The rules are the coordinator's: every case here passes its check, and every request a hand
    could build that the coordinator refuses is refused here too (as ValueError, before any RPC)."""
    from services.common.errors import InvalidArgument
    from services.coordinator.server import parse_params

    for kw in CASES.values():
        parse_params(SamplingOptions(**kw).to_proto())
    refused = [
        pb.GenerateRequest(sampling=dict(temperature=-1.0)),
        pb.GenerateRequest(sampling=dict(temperature=math.inf)),
        pb.GenerateRequest(sampling=dict(top_k=-1)),
        pb.GenerateRequest(sampling=dict(top_p=1.5)),
        pb.GenerateRequest(sampling=dict(repetition_penalty=math.nan)),
        pb.GenerateRequest(max_tokens=-1),
        pb.GenerateRequest(logprobs=MAX_LOGPROBS + 1),
        pb.GenerateRequest(stop=[""]),
    ]
    for request in refused:
        with pytest.raises(InvalidArgument):
            parse_params(request)
        with pytest.raises(ValueError):
            SamplingOptions.from_proto(request)


def test_generate_options_names_the_same_fields():
    # The keyword arguments of Client.chat/stream (typed by GenerateOptions) are the dataclass's
    # fields, and what shapes the output besides sampling (tools, response_format).
    hints = set(typing.get_type_hints(GenerateOptions))
    fields = {f.name for f in dataclasses.fields(SamplingOptions)}
    assert fields <= hints and hints - fields == {"response_format", "tools", "tool_choice", "parallel_tool_calls", "n"}
