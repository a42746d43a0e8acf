"""How a reply is generated: token selection and when to stop, as one immutable value.

    from vlmesh.sampling import SamplingOptions

    opts = SamplingOptions(temperature=0.7, top_p=0.9, seed=1, max_tokens=64, stop="\\n\\n")
    request = opts.to_proto()                  # a GenerateRequest with these fields set
    request.messages.extend(...)               # the caller adds the conversation (and session_id)
    assert SamplingOptions.from_proto(request) == opts

Every check runs when the value is made, so a bad option costs no round trip; the rules are the
coordinator's, so what passes here is never refused there for its options. The value holds what
the wire will carry (floats as float32 does, written shortest) and one spelling of each "off"
(top_p and repetition_penalty 1.0, max_tokens None), so options that generate alike compare equal
and a round trip through the proto gives the same value.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmesh.v1 import coordinator_pb2 as pb
from vlmesh.v1 import tensor_pb2

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1
#: Most alternatives per token the coordinator returns (`logprobs`), as OpenAI's API allows.
MAX_LOGPROBS = 20


def _float32(name: str, value: float) -> float:
    """`value` as the wire's float32 carries it, written with the fewest digits that give the same
    float32 (0.7, not 0.699999988): what the coordinator will use, and equal after a round trip.
    Refuses what would arrive as inf or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        bits = struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: inf on the wire
        bits = struct.pack("<f", math.inf)
    narrowed: float = struct.unpack("<f", bits)[0]
    if not math.isfinite(narrowed):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        shortest = float(f"{narrowed:.{digits}g}")
        if struct.pack("<f", shortest) == bits:
            return shortest
    return narrowed


def _integer(name: str, value: int, low: int, high: int, hint: str = "") -> None:
    """Refuses `value` unless it is an int in [low, high]; bool is refused (True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = "2**64 - 1" if high == _UINT64_MAX else str(high)
        raise ValueError(f"{name} must be an integer from {low} to {shown}{hint}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """The options of one Generate call (everything but the conversation and the session).

    Attributes:
        max_tokens: most tokens to generate; None = the coordinator's default.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_k: keep the k most likely tokens; 0 = off.
        top_p: nucleus sampling mass in [0, 1]; 1 (or 0) = off.
        repetition_penalty: HF-style penalty over prompt and generated tokens; 1 (or 0) = off.
        seed: sampling seed in [0, 2**64); same seed => same tokens. None = the coordinator picks one.
        stop: string(s) that end generation; not included in the text. A single string is one stop.
        logprobs: return each token's log-probability and this many alternatives (0..20).
        include_stop_token_text: keep the end-of-turn token's text in the reply.

    Raises:
        ValueError: an option out of range or of the wrong type (when the value is made).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()  # a tuple once made; a single str is one stop string
    logprobs: int = 0
    include_stop_token_text: bool = False
    # Structured output (JSON schema, JSON object, regex, choice or grammar), applied by the
    # sampling stage; None = free text. Compared, not hashed (a proto message has no hash).
    constraint: tensor_pb2.Constraint | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # Frozen: the checked and normalised values are set once, here, and never again.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.max_tokens is not None:
            # 0 means "the coordinator's default" on the wire; an explicit 0 here is more likely a bug.
            _integer("max_tokens", self.max_tokens, 1, _INT32_MAX, " or None")
        temperature = _float32("temperature", self.temperature)
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        put("temperature", temperature)
        _integer("top_k", self.top_k, 0, _INT32_MAX, " (0 = off)")
        top_p = _float32("top_p", self.top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        put("top_p", 1.0 if top_p == 0.0 else top_p)
        penalty = _float32("repetition_penalty", self.repetition_penalty)
        if penalty < 0.0:
            raise ValueError(f"repetition_penalty must be >= 0 (1 = off), got {self.repetition_penalty!r}")
        put("repetition_penalty", 1.0 if penalty == 0.0 else penalty)
        if self.seed is not None:
            _integer("seed", self.seed, 0, _UINT64_MAX, " or None")
        stop: object = self.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, Sequence) else None
        if stops is None or not all(isinstance(s, str) and s for s in stops):
            # An empty stop string matches every text and would end generation at once.
            raise ValueError(f"stop must be a non-empty string or a sequence of them, got {stop!r}")
        put("stop", stops)
        _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.include_stop_token_text, bool):
            raise ValueError(f"include_stop_token_text must be True or False, got {self.include_stop_token_text!r}")

    @property
    def greedy(self) -> bool:
        """Whether the reply is the argmax at every step (then seed, top_k and top_p change nothing)."""
        return self.temperature == 0.0

    def sampling_proto(self) -> tensor_pb2.SamplingParams:
        """The token-selection part, as the coordinator forwards it to the last stage."""
        params = tensor_pb2.SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty
        )
        if self.seed is not None:
            params.seed = self.seed
        if self.constraint is not None:
            params.constraint.CopyFrom(self.constraint)
        return params

    def to_proto(self) -> pb.GenerateRequest:
        """A GenerateRequest with these options set and no conversation: the caller adds
        `messages` (and `session_id`)."""
        return pb.GenerateRequest(
            sampling=self.sampling_proto(),
            max_tokens=self.max_tokens or 0,
            stop=list(self.stop),
            logprobs=self.logprobs,
            include_stop_token_text=self.include_stop_token_text,
        )

    @classmethod
    def from_proto(cls, request: pb.GenerateRequest) -> SamplingOptions:
        """The options of a GenerateRequest (its messages and session are not read).

        Raises:
            ValueError: a field out of range (a request built by hand, not by `to_proto`).
        """
        p = request.sampling
        return cls(
            max_tokens=request.max_tokens or None,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(request.stop),
            logprobs=request.logprobs,
            include_stop_token_text=request.include_stop_token_text,
            constraint=p.constraint if p.HasField("constraint") else None,
        )
