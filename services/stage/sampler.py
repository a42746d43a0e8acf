"""Token selection on the last stage, with transformers' own logits processors (same order as
`generate`: repetition penalty, temperature, top-k, top-p), so sampling means what HF users expect.

Sampling keeps no state between steps: the token at position p is drawn with a generator seeded
from (seed, p). So a replica that takes over a session draws exactly what the lost one would
have, and nothing about a session's sampling has to be saved or restored.

A constraint (structured output) is a token mask applied before those processors. Its state is a
function of the turn's generated tokens, which the coordinator sends with each step, so it too
survives failover: `Constraints` keeps each session's matcher only as a cache, rebuilt from the
tokens whenever it is missing or out of step."""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.common.errors import InvalidArgument
from vlmesh.v1 import tensor_pb2

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0  # 0 or 1 = off
    repetition_penalty: float = 1.0  # 0 or 1 = off
    seed: int = 0
    # [V] bool: the tokens a constraint lets through at this step; None = all (free text).
    allowed: torch.Tensor | None = field(default=None, compare=False)

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.top_p <= 1.0):  # also refuses NaN
            raise InvalidArgument(f"top_p must be in [0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 0.0):
            raise InvalidArgument(f"repetition_penalty must be a finite number >= 0 (0 or 1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty not in (0.0, 1.0)

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.penalised:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if 0.0 < self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class Sample:
    token_id: int
    logprob: float  # of the raw distribution, as vLLM reports it
    top: list[tuple[int, float]]


def generator_for(seed: int, position: int) -> torch.Generator:
    """splitmix64 of (seed, position): neighbouring positions get unrelated streams."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(z ^ (z >> 31))


def sample(
    logits: torch.Tensor,  # [V] float32, last position
    params: SamplingParams,
    position: int,  # the position the sampled token will take
    penalty_ids: torch.Tensor | None = None,  # [K] int64: the session's distinct tokens so far
    top_logprobs: int = 0,
) -> Sample:
    logits = logits.cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    procs = params.processors()
    history = penalty_ids if penalty_ids is not None else torch.empty(0, dtype=torch.long)
    masked = logits if params.allowed is None else torch.where(_fit(params.allowed, logits.numel()), logits, -math.inf)
    scores = procs(history[None], masked[None])[0] if len(procs) else masked  # type: ignore[arg-type]
    if params.greedy:
        token = int(torch.argmax(scores))
    else:
        probs = torch.softmax(scores, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator_for(params.seed, position)))
    top: list[tuple[int, float]] = []
    if top_logprobs > 0:
        vals, idx = torch.topk(logprobs, min(top_logprobs, logprobs.numel()))
        top = list(zip(idx.tolist(), vals.tolist()))
    return Sample(token, float(logprobs[token]), top)


def _fit(allowed: torch.Tensor, n: int) -> torch.Tensor:
    """The mask over n logits: rows of the head past the tokenizer's vocabulary are never allowed."""
    if allowed.numel() >= n:
        return allowed[:n]
    return torch.cat([allowed, torch.zeros(n - allowed.numel(), dtype=torch.bool)])


# JSON without free whitespace: every token must advance the value, so an output always ends.
_COMPACT_JSON: JsonCompileOptions = {"whitespace_flexible": False}
#: Longest constraint text. Compilation runs on the stage's runner thread and grows faster than
#: linearly with a pathological regex; real schemas and grammars are a few KiB.
MAX_CONSTRAINT_BYTES = 32 << 10
# verbose_errors off: a failed matcher's message names the problem, not the parser's whole state.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


def grammar_of(c: tensor_pb2.Constraint) -> str:
    """The llguidance grammar of a constraint (not compiled yet: `Constraints` does that)."""
    try:
        return _grammar_of(c)
    except (ValueError, TypeError) as err:  # llguidance refusing what it was given
        raise InvalidArgument(f"the constraint does not compile: {err}") from None


def _grammar_of(c: tensor_pb2.Constraint) -> str:
    kind = c.WhichOneof("kind")
    size = c.ByteSize()
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"the constraint is {size} bytes; the limit is {MAX_CONSTRAINT_BYTES}")
    if kind == "json_schema":
        try:
            schema = json.loads(c.json_schema)
        except ValueError as err:
            raise InvalidArgument(f"json_schema is not valid JSON: {err}") from None
        except RecursionError:
            raise InvalidArgument("json_schema nests too deeply") from None
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema must be a JSON object (a schema)")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT_JSON)
    if kind == "json_object":
        if not c.json_object:
            raise InvalidArgument("json_object: false is not a constraint; leave the constraint unset")
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT_JSON)
    if kind == "regex":
        if not c.regex:
            raise InvalidArgument("regex must not be empty")
        return llguidance.LLMatcher.grammar_from_regex(c.regex)
    if kind == "choice":
        if not c.choice.options or any(not o for o in c.choice.options):
            raise InvalidArgument("choice needs at least one option, none of them empty")
        # JSON string literals are Lark string literals: any text is quoted safely.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in c.choice.options))
    if kind == "grammar":
        if not c.grammar.strip():
            raise InvalidArgument("grammar must not be empty")
        return llguidance.LLMatcher.grammar_from_lark(c.grammar)
    raise InvalidArgument("a constraint needs one of json_schema, json_object, regex, choice or grammar")


def eos_token_ids(model_dir: str | Path) -> list[int]:
    """The ids that end a turn, as the coordinator reads them (generation_config.json, else config.json)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        config = AutoConfig.from_pretrained(model_dir)
        eos = getattr(config.get_text_config(), "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


@dataclass
class _Tracked:
    """A session's matcher and the tokens it has consumed (its state is a function of them)."""

    matcher: llguidance.LLMatcher
    consumed: list[int]


class Constraints:
    """Compiled constraints (one per distinct grammar, by hash) and each session's matcher.

    Used on the last stage's runner thread only. The session matchers are a cache: a step carries
    the turn's generated tokens, and a matcher that is missing (another replica served the session
    before, or it was evicted) or out of step (a replay, a new turn) is rebuilt from them."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, eos_ids: Sequence[int], max_compiled: int = 64, max_sessions: int = 1024):
        self.tokenizer_dir = str(tokenizer_dir)
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.max_compiled = max_compiled
        self.max_sessions = max_sessions
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._sessions: OrderedDict[tuple[str, str], _Tracked] = OrderedDict()
        # Row b: the 8 bits of byte value b, lowest first (llguidance's bitmask is little-endian).
        self._byte_bits = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()

    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use: only a last stage that sees a constraint pays for it."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            try:
                hf = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            except OSError as err:
                raise InvalidArgument(f"structured output needs the checkpoint's tokenizer files: {err}") from None
            if not isinstance(hf, TokenizersBackend):  # llguidance reads the tokenizers (Rust) vocabulary
                raise InvalidArgument(f"structured output needs a fast tokenizer; {self.tokenizer_dir} has {type(hf).__name__}")
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.eos_ids or None)
        return self._tokenizer

    def compiled(self, constraint: tensor_pb2.Constraint) -> tuple[str, llguidance.LLMatcher]:
        """(the constraint's hash, its compiled matcher in the start state; copy before use).
        Keyed by the constraint's bytes: a hit costs neither the grammar's translation nor its compilation."""
        key = hashlib.sha256(constraint.SerializeToString(deterministic=True)).hexdigest()
        found = self._compiled.get(key)
        if found is not None:
            self._compiled.move_to_end(key)
            return key, found
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar_of(constraint), log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise InvalidArgument(f"the constraint does not compile: {matcher.get_error().strip()}")
        self._compiled[key] = matcher
        if len(self._compiled) > self.max_compiled:
            self._compiled.popitem(last=False)
        return key, matcher

    def mask(self, session_id: str, constraint: tensor_pb2.Constraint, generated: Sequence[int]) -> torch.Tensor:
        """[vocab_size] bool: the tokens that may follow `generated` (only the end of turn once the
        text is complete). InvalidArgument: the constraint does not compile, or `generated` breaks it."""
        key, template = self.compiled(constraint)
        slot = (session_id, key)
        tracked = self._sessions.pop(slot, None)
        n = len(tracked.consumed) if tracked is not None else 0
        if tracked is None or len(generated) < n or list(generated[:n]) != tracked.consumed:
            tracked = _Tracked(template.deep_copy(), [])
        for i, token in enumerate(generated[len(tracked.consumed) :], start=len(tracked.consumed)):
            if not 0 <= token < self.vocab_size or not tracked.matcher.consume_token(int(token)):
                raise InvalidArgument(f"generated token {int(token)} (output token {i}) is outside the constraint")
            tracked.consumed.append(int(token))
        self._sessions[slot] = tracked
        if len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        m = tracked.matcher
        allowed: torch.Tensor | None = None
        if not m.is_stopped():
            raw = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.uint8)
            if m.is_error():
                raise InvalidArgument(f"the constraint cannot go on: {m.get_error().strip().splitlines()[0]}")
            allowed = self._byte_bits.index_select(0, raw.int()).flatten()[: self.vocab_size]
        if allowed is None or not bool(allowed.any()):
            # The text is complete: the turn ends here (finish reason stop).
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[self.eos_ids[:1] or [self.tokenizer().eos_token]] = True
        return allowed
