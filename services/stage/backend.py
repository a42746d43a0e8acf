"""One stage's block range: validates a batch of steps, admits it against the KV budget, runs
it through the layers (decode steps of several sessions in one forward pass), samples on the
last stage. Plain exceptions only; the handler turns them into statuses."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from services.common.checkpoint import Checkpoint
from services.common.errors import InvalidInput, WrongStage

from .kv_cache import BatchKV, KVCache
from .model import StageModel
from .sampler import Sample, SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One session's step, decoded and validated by the handler."""

    session_id: str
    start_position: int
    token_ids: torch.Tensor  # [T] int64 (may be empty on middle stages)
    hidden: torch.Tensor | None  # [T, H] (None on the first stage)
    position_ids: torch.Tensor  # [3, T] int64
    visual: torch.Tensor | None  # [N, H] first stage only
    return_kv_delta: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0
    turn_start: bool = False

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[1]


@dataclass
class StepResult:
    session_id: str
    hidden: torch.Tensor | None  # [T, H] when not the last stage
    sample: Sample | None  # last stage
    kv_delta: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> ([H, T, D], [H, T, D])
    cache_length: int


@dataclass
class _SamplerState:
    history: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class StageBackend:
    def __init__(self, ckpt: Checkpoint, start: int, end: int, dtype: torch.dtype, kv_budget_bytes: int, max_batch: int = 32):
        self.ckpt = ckpt
        self.model = StageModel(ckpt, start, end, dtype)
        tc = ckpt.text_config
        self.dtype = dtype
        self.hidden_size = tc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        per_token = 2 * (end - start) * tc.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.kv = KVCache(kv_budget_bytes, per_token, start, end)
        self.visual_ids = tuple(
            i for i in (getattr(ckpt.config, "image_token_id", None), getattr(ckpt.config, "video_token_id", None)) if i is not None
        )
        self.max_batch = max_batch
        self._samplers: dict[str, _SamplerState] = {}
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def validate(self, step: Step) -> None:
        t = step.num_tokens
        if t == 0:
            raise InvalidInput(f"session {step.session_id!r}: a step needs at least one position")
        if self.is_first:
            if step.token_ids.shape != (t,):
                raise InvalidInput(f"session {step.session_id!r}: {step.token_ids.shape[0]} token_ids for {t} positions")
            if step.hidden is not None:
                raise WrongStage("the first stage embeds token_ids itself; it takes no hidden_states")
            vocab = self.ckpt.text_config.vocab_size
            if int(step.token_ids.min()) < 0 or int(step.token_ids.max()) >= vocab:
                raise InvalidInput(f"session {step.session_id!r}: token id outside [0, {vocab})")
            placeholders = int(torch.isin(step.token_ids, torch.tensor(self.visual_ids)).sum())
            rows = 0 if step.visual is None else step.visual.shape[0]
            if placeholders != rows:
                raise InvalidInput(
                    f"session {step.session_id!r}: {placeholders} visual placeholder tokens but {rows} visual embedding rows"
                )
            if step.visual is not None and step.visual.shape[1] != self.hidden_size:
                raise InvalidInput(f"session {step.session_id!r}: visual_embeds width {step.visual.shape[1]} != {self.hidden_size}")
        else:
            if step.hidden is None:
                raise InvalidInput(f"session {step.session_id!r}: stage {self.model.start}:{self.model.end} needs hidden_states")
            if step.hidden.shape != (t, self.hidden_size):
                raise InvalidInput(
                    f"session {step.session_id!r}: hidden_states shape {list(step.hidden.shape)} does not match [{t}, {self.hidden_size}]"
                )
            if step.visual is not None:
                raise WrongStage("visual_embeds go to the first stage only")
            if self.is_last and step.token_ids.numel() not in (0, t):
                raise InvalidInput(f"session {step.session_id!r}: {step.token_ids.numel()} token_ids for {t} positions")
        if step.start_position < 0:
            raise InvalidInput(f"session {step.session_id!r}: negative start_position")
        limit = self.ckpt.text_config.max_position_embeddings
        if step.start_position + t > limit:
            raise InvalidInput(f"session {step.session_id!r}: {step.start_position + t} positions exceed the model's limit of {limit}")
        step.sampling.validate()
        self.kv.check(step.session_id, step.start_position)

    def run(self, steps: list[Step]) -> list[StepResult]:
        if len(steps) > self.max_batch:
            raise InvalidInput(f"{len(steps)} steps in one request; this stage takes at most {self.max_batch}")
        ids = [s.session_id for s in steps]
        if len(set(ids)) != len(ids):
            raise InvalidInput("a request holds two steps of the same session")
        for s in steps:
            self.validate(s)
        with self._lock, self.kv.reserve({s.session_id: s.num_tokens for s in steps}), torch.inference_mode():
            results: dict[str, StepResult] = {}
            decode = [s for s in steps if s.num_tokens == 1]
            groups = [decode] if decode else []
            groups += [[s] for s in steps if s.num_tokens > 1]
            for group in groups:
                for r in self._forward(group):
                    results[r.session_id] = r
            return [results[i] for i in ids]

    def _forward(self, group: list[Step]) -> list[StepResult]:
        sessions = [self.kv.get(s.session_id, s.start_position) for s in group]
        kv = BatchKV(sessions, group[0].num_tokens, [s.return_kv_delta for s in group])
        positions = torch.stack([s.position_ids for s in group], dim=1)  # [3, B, T]
        if self.is_first:
            hidden = torch.cat(
                [self.model.embed(s.token_ids[None], s.visual, self.visual_ids) for s in group]
            )  # [B, T, H]
        else:
            hidden = torch.stack([s.hidden.to(self.dtype) for s in group])
        try:
            hidden = self.model(hidden, positions, kv)
        except Exception:
            # Keep the cache consistent with what the coordinator believes: roll back the step.
            for s, past in zip(sessions, kv.past):
                s.truncate(past)
            raise
        samples: list[Sample | None] = [None] * len(group)
        if self.is_last:
            logits = self.model.logits(hidden)  # [B, V]
            for i, s in enumerate(group):
                samples[i] = self._sample(s, logits[i])
        return [
            StepResult(
                s.session_id,
                None if self.is_last else hidden[i],
                samples[i],
                kv.deltas[i],
                sessions[i].length,
            )
            for i, s in enumerate(group)
        ]

    def _sample(self, step: Step, logits: torch.Tensor) -> Sample:
        state = self._samplers.get(step.session_id)
        if state is None or step.start_position == 0:
            state = self._samplers[step.session_id] = _SamplerState()
        if step.turn_start:
            seed = step.sampling.seed
            state.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        state.history.extend(step.token_ids.tolist())
        history = torch.tensor(state.history, dtype=torch.long)
        return sample(logits, step.sampling, history, state.generator, step.top_logprobs)

    def release(self, session_id: str) -> int:
        self._samplers.pop(session_id, None)
        return self.kv.release(session_id)

    def expire(self, idle_seconds: float) -> list[str]:
        gone = self.kv.expire(idle_seconds)
        for sid in gone:
            self._samplers.pop(sid, None)
        return gone
