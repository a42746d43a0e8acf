"""Constrained decoding at the sampler, on the shipped model's real tokenizer: the mask keeps every
sampled text inside its constraint (greedy and seeded, over random logits), the turn ends once the
text is complete, a matcher rebuilt from the tokens (another replica) masks exactly as the cached
one, and a constraint that does not compile is INVALID_ARGUMENT naming the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.shapes import SHIPPED_MODEL
from services.stage.sampler import Constraints, SamplingParams, eos_token_ids, grammar_of, sample
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


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def eos() -> list[int]:
    return eos_token_ids(SHIPPED_MODEL)


@pytest.fixture
def constraints(hf, eos) -> Constraints:
    return Constraints(SHIPPED_MODEL, 1088, eos)


def schema_constraint(schema: dict = SCHEMA) -> tensor_pb2.Constraint:
    return tensor_pb2.Constraint(json_schema=json.dumps(schema))


def decode(constraints: Constraints, c: tensor_pb2.Constraint, params: SamplingParams, seed: int, limit: int = 200) -> tuple[list[int], bool]:
    """(the tokens sampled under c over seeded random logits, whether an end-of-turn token came)."""
    logits_gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for position in range(limit):
        allowed = constraints.mask("s", c, ids)
        logits = torch.randn(1088, generator=logits_gen) * 4
        tok = sample(logits, SamplingParams(**{**params.__dict__, "allowed": allowed}), position).token_id
        if tok in constraints.eos_ids:
            return ids, True
        ids.append(tok)
    return ids, False


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=1.0, top_k=50, seed=7), SamplingParams(temperature=0.7, top_p=0.9, seed=3)]
)
@pytest.mark.parametrize("seed", range(4))
def test_schema_output_always_parses_validates_and_ends(constraints, hf, params, seed):
    ids, ended = decode(constraints, schema_constraint(), params, seed)
    assert ended, "the output never ended"
    text = hf.decode(ids)
    assert " " not in text and "\n" not in text  # compact JSON: no free whitespace
    jsonschema.validate(json.loads(text), SCHEMA)


def test_without_the_mask_the_same_logits_give_no_json(constraints, hf):
    """The mask is what makes the output JSON: the same random logits unmasked are noise."""
    gen = torch.Generator().manual_seed(0)
    ids = [sample(torch.randn(1088, generator=gen) * 4, SamplingParams(), p).token_id for p in range(30)]
    with pytest.raises(ValueError):
        json.loads(hf.decode(ids))


def test_json_object_regex_and_choice_hold(constraints, hf):
    for seed in (1, 3):  # (seeds whose random walk ends: a string of random logits may run on, till max_tokens)
        ids, ended = decode(constraints, tensor_pb2.Constraint(json_object=True), SamplingParams(temperature=1.0, seed=seed), seed, limit=400)
        assert ended and isinstance(json.loads(hf.decode(ids)), dict)
    for seed in range(3):
        ids, ended = decode(constraints, tensor_pb2.Constraint(regex=r"[A-Z][a-z]{2,5}-[0-9]{3}"), SamplingParams(temperature=1.0, seed=seed), seed)
        assert ended and re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", hf.decode(ids))
        options = ["red circle", 'a "quoted" square', "blue"]
        c = tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=options))
        ids, ended = decode(constraints, c, SamplingParams(temperature=1.0, seed=seed), seed)
        assert ended and hf.decode(ids) in options


def test_a_complete_text_allows_only_the_end_of_turn(constraints, hf):
    c = tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=["yes"]))
    ids = hf.encode("yes")
    allowed = constraints.mask("s", c, ids)
    assert allowed.nonzero().flatten().tolist() == [constraints.eos_ids[0]]
    # Greedy sampling then picks it even where the raw logits favour something else.
    logits = torch.zeros(1088)
    logits[5] = 100.0
    assert sample(logits, SamplingParams(allowed=allowed), len(ids)).token_id == constraints.eos_ids[0]


def test_a_rebuilt_matcher_masks_as_the_cached_one(constraints, hf, eos):
    """Failover: a replica that never saw the session rebuilds the state from the tokens alone."""
    c = schema_constraint()
    ids, _ = decode(constraints, c, SamplingParams(temperature=1.0, seed=5), 11)
    other = Constraints(SHIPPED_MODEL, 1088, eos)
    for n in (1, len(ids) // 2, len(ids)):
        assert torch.equal(constraints.mask("s", c, ids[:n]), other.mask("s", c, ids[:n]))
    # Out of step (a replay from an earlier point, a new turn): rebuilt, not advanced.
    assert torch.equal(constraints.mask("s", c, ids[:2]), other.mask("fresh", c, ids[:2]))
    assert torch.equal(constraints.mask("s", c, []), other.mask("fresh2", c, []))


def test_one_compilation_per_distinct_constraint(constraints):
    key, first = constraints.compiled(schema_constraint())
    again = constraints.compiled(schema_constraint())  # another message, the same bytes
    assert again[0] == key and again[1] is first  # the same compiled matcher, not a new one
    other = constraints.compiled(tensor_pb2.Constraint(regex="a+"))
    assert other[0] != key and other[1] is not first


def test_every_kind_has_a_grammar():
    kinds = {f.name for f in tensor_pb2.Constraint.DESCRIPTOR.oneofs_by_name["kind"].fields}
    examples = [
        schema_constraint(),
        tensor_pb2.Constraint(json_object=True),
        tensor_pb2.Constraint(regex="a"),
        tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=["a"])),
        tensor_pb2.Constraint(grammar='start: "a"'),
    ]
    assert {c.WhichOneof("kind") for c in examples} == kinds
    assert all(grammar_of(c) for c in examples)


@pytest.mark.parametrize(
    ("c", "needle"),
    [
        (tensor_pb2.Constraint(regex="[a-"), "regex"),
        (tensor_pb2.Constraint(json_schema='{"type": "frobnicate"}'), "frobnicate"),
        (tensor_pb2.Constraint(json_schema="{not json"), "not valid JSON"),
        (tensor_pb2.Constraint(json_schema="[1, 2]"), "JSON object"),
        (tensor_pb2.Constraint(grammar="start: missing_rule"), "missing_rule"),
        (tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=[])), "choice"),
        (tensor_pb2.Constraint(choice=tensor_pb2.Choices(options=["a", ""])), "empty"),
        (tensor_pb2.Constraint(json_object=False), "json_object"),
        (tensor_pb2.Constraint(), "one of"),
        (tensor_pb2.Constraint(json_schema="[" * 5000 + "]" * 5000), "nests too deeply"),
        (tensor_pb2.Constraint(regex="(a|b)*" * 10000), "the limit is"),  # would compile for seconds on the runner thread
    ],
)
def test_a_bad_constraint_is_invalid_argument_naming_the_problem(constraints, c, needle):
    with pytest.raises(InvalidArgument) as err:
        constraints.mask("s", c, [])
    assert needle in str(err.value)


@pytest.mark.parametrize("bad", ["12ab", -1, 2**40, 1088])
def test_tokens_outside_the_constraint_are_refused(constraints, hf, bad):
    ids = hf.encode(bad) if isinstance(bad, str) else [bad]
    with pytest.raises(InvalidArgument, match="outside the constraint"):
        constraints.mask("s", tensor_pb2.Constraint(regex="[0-9]+"), ids)


# ---------------------------------------------------------------- the gateway's request shapes


def _chat(**kw):
    from services.gateway.request import parse_chat_request

    return parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_gateway_request_shapes_become_the_mesh_constraint():
    assert "constraint" not in _chat().options
    assert "constraint" not in _chat(response_format={"type": "text"}).options
    assert _chat(response_format={"type": "json_object"}).options["constraint"] == tensor_pb2.Constraint(json_object=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    assert json.loads(_chat(response_format=fmt).options["constraint"].json_schema) == SCHEMA
    assert json.loads(_chat(structured_outputs={"json": json.dumps(SCHEMA)}).options["constraint"].json_schema) == SCHEMA
    assert _chat(structured_outputs={"regex": "a+"}).options["constraint"] == tensor_pb2.Constraint(regex="a+")
    assert list(_chat(structured_outputs={"choice": ["x", "y"]}).options["constraint"].choice.options) == ["x", "y"]
    assert _chat(structured_outputs={"grammar": 'start: "a"'}).options["constraint"] == tensor_pb2.Constraint(grammar='start: "a"')


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}}, "response_format.json_schema.extra"),
        ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ],
)
def test_gateway_refuses_malformed_shapes_naming_the_param(kw, param):
    from services.gateway.errors import ApiError

    with pytest.raises(ApiError) as err:
        _chat(**kw)
    assert err.value.status == 400 and err.value.param == param
