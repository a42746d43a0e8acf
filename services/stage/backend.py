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
    deepstack: dict[int, torch.Tensor] = field(default_factory=dict)  # global layer -> [N, H] (Qwen3-VL)
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
    def __init__(
        self, ckpt: Checkpoint, start: int, end: int, dtype: torch.dtype, kv_budget_bytes: int, max_batch: int = 32, quantize: str = "auto"
    ):
        self.ckpt = ckpt
        self.model = StageModel(ckpt, start, end, dtype, quantize)
        tc = ckpt.text_config
        self.dtype = dtype
        self.hidden_size = tc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        per_token = 2 * (end - start) * tc.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.kv = KVCache(kv_budget_bytes, per_token, start, end)
        self.visual_ids = tuple(
            i for i in (getattr(ckpt.config, "image_token_id", None), getattr(ckpt.config, "video_token_id", None)) if i is not None
        )
        self._visual_ids = torch.tensor(self.visual_ids, dtype=torch.long)
        self.max_batch = max_batch
        self._samplers: dict[str, _SamplerState] = {}
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def visual_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Where the image and video placeholders are (the positions visual features go to)."""
        return torch.isin(token_ids, self._visual_ids)

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
            placeholders = int(self.visual_mask(step.token_ids).sum())
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
            if step.token_ids.numel() not in (0, t):
                raise InvalidInput(f"session {step.session_id!r}: {step.token_ids.numel()} token_ids for {t} positions")
        self._validate_deepstack(step)
        if step.start_position < 0:
            raise InvalidInput(f"session {step.session_id!r}: negative start_position")
        limit = self.ckpt.text_config.max_position_embeddings
        if step.start_position + t > limit:
            raise InvalidInput(f"session {step.session_id!r}: {step.start_position + t} positions exceed the model's limit of {limit}")
        step.sampling.validate()
        self.kv.check(step.session_id, step.start_position)

    def _validate_deepstack(self, step: Step) -> None:
        """DeepStack features only for owned layers below k, one row per placeholder token; and a
        step whose token_ids hold placeholders must bring one for every owned layer below k (a
        coordinator that forgot them would otherwise go unnoticed: the output just drifts)."""
        name = f"session {step.session_id!r}"
        owned = set(self.model.deepstack_layers)
        extra = sorted(set(step.deepstack) - owned)
        if extra:
            raise WrongStage(
                f"{name}: deepstack features for layers {extra}, but this stage {self.model.start}:{self.model.end} "
                f"adds them only after layers {sorted(owned)}"
            )
        placeholders = int(self.visual_mask(step.token_ids).sum()) if step.token_ids.numel() else 0
        if step.deepstack and step.token_ids.numel() == 0:
            raise InvalidInput(f"{name}: deepstack features need the step's token_ids (to find the visual positions)")
        if placeholders and owned and set(step.deepstack) != owned:
            missing = sorted(owned - set(step.deepstack))
            raise InvalidInput(f"{name}: {placeholders} visual placeholder tokens but no deepstack features for layers {missing}")
        for layer, feature in step.deepstack.items():
            if feature.shape != (placeholders, self.hidden_size):
                raise InvalidInput(
                    f"{name}: deepstack features of layer {layer} have shape {list(feature.shape)}, "
                    f"want [{placeholders}, {self.hidden_size}] (one row per visual placeholder token)"
                )

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
        visual_mask, deepstack = self._deepstack_inputs(group)
        try:
            hidden = self.model(hidden, positions, kv, visual_mask, deepstack)
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

    def _deepstack_inputs(self, group: list[Step]) -> tuple[torch.Tensor | None, dict[int, torch.Tensor] | None]:
        """The [B, T] visual mask and, per layer, the rows of every step in batch order (a step
        without features contributes no row and no True position)."""
        if not any(s.deepstack for s in group):
            return None, None
        deepstack = {}
        masks = [self.visual_mask(s.token_ids) if s.deepstack else torch.zeros(s.num_tokens, dtype=torch.bool) for s in group]
        for layer in self.model.deepstack_layers:
            rows = [s.deepstack[layer].to(self.dtype) for s in group if layer in s.deepstack]
            if rows:
                deepstack[layer] = torch.cat(rows)
        return torch.stack(masks), deepstack

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
