"""One stage's block range: runs a batch of session steps as one forward pass (the model runner).

Each step is validated and admitted against the KV budget on its own; a step that fails gets its
own error and the rest run. The sessions' tokens go side by side through the layers ([1, N, H]);
attention is per session over its KV in place (numerics "exact") or one padded call per layer
(numerics "fast"; attention.py). Plain exceptions only; the handler
turns them into statuses. Called from one thread at a time (the stage's runner thread)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from services.common.checkpoint import Checkpoint
from services.common.errors import InvalidArgument, VlmeshError, WrongStage

from .kv_cache import BatchKV, KVCache, KVShape, SessionKV
from .model import StageModel
from .sampler import Sample, SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass
class SampleSpec:
    params: SamplingParams
    top_logprobs: int = 0
    penalty_ids: torch.Tensor | None = None  # [K] int64
    fork_seeds: tuple[int, ...] = ()  # one more token per fork, same logits, these seeds


@dataclass
class Step:
    """One session's step, decoded from the wire by the handler."""

    session_id: str
    start: int  # positions already cached
    positions: torch.Tensor  # [3, T] int64
    token_ids: torch.Tensor | None = None  # [T] int64, first stage
    hidden: torch.Tensor | None = None  # [T, H], other stages
    visual_index: torch.Tensor | None = None  # [M] int64: offsets in the step of the visual rows
    visual: torch.Tensor | None = None  # [M, H], first stage
    deepstack: dict[int, torch.Tensor] = field(default_factory=dict)  # global layer -> [M, H]
    sample: SampleSpec | None = None  # last stage
    return_kv_delta: bool = False
    rewind: bool = False  # drop the positions from `start` on first (prefix reuse)
    forks: tuple[str, ...] = ()  # sessions that start as copies of this one after the step

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]


@dataclass
class StepResult:
    session_id: str
    error: VlmeshError | None = None  # the step did not run
    cache_length: int = 0
    hidden: torch.Tensor | None = None  # [T, H], non-last stages
    token: Sample | None = None  # last stage, when asked
    fork_tokens: list[Sample] = field(default_factory=list)  # last stage: one per fork seed
    kv_delta: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> ([H, T, D], [H, T, D])


class StageBackend:
    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        dtype: torch.dtype,
        kv_budget_bytes: int,
        *,
        device: torch.device = torch.device("cpu"),
        lease_seconds: float = 60.0,
        max_batch: int = 64,
        quantize: str = "auto",
        numerics: str = "exact",
        prepack: bool = True,
    ):
        self.ckpt = ckpt
        self.model = StageModel(ckpt, start, end, dtype, device, quantize, numerics, prepack)
        tc = ckpt.text_config
        self.dtype = dtype
        self.device = device
        self.hidden_size = tc.hidden_size
        self.vocab_size = tc.vocab_size
        self.max_positions = tc.max_position_embeddings
        self.kv = KVCache(KVShape.for_model(tc, range(start, end), dtype, device), kv_budget_bytes, lease_seconds)
        self.max_batch = max_batch

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def validate(self, step: Step) -> None:
        """Everything about one step that can be known before running it. Raises InvalidArgument
        (malformed) or WrongStage (this stage cannot run it)."""
        t = step.num_tokens
        if t == 0:
            raise InvalidArgument("a step needs at least one position")
        if self.is_first:
            self._validate_first_inputs(step, t)
        else:
            self._validate_hidden_inputs(step, t)
        if step.visual_index is not None and step.visual_index.numel():
            if int(step.visual_index.min()) < 0 or int(step.visual_index.max()) >= t:
                raise InvalidArgument(f"visual spans reach outside the step's {t} positions")
        self._validate_deepstack(step)
        if step.sample is not None:
            self._validate_sample(step.sample)
        if step.start < 0:
            raise InvalidArgument("negative start_position")
        if step.start + t > self.max_positions:
            raise InvalidArgument(f"{step.start + t} positions exceed the model's limit of {self.max_positions}")
        self.kv.check(step.session_id, step.start, step.rewind)

    def _validate_first_inputs(self, step: Step, t: int) -> None:
        """The first stage's inputs: t token ids and the visual rows to scatter over them."""
        if step.token_ids is None or step.hidden is not None:
            raise WrongStage("the first stage embeds token ids itself; send tokens, not hidden_states")
        if step.token_ids.shape != (t,):
            raise InvalidArgument(f"{step.token_ids.shape[0]} token ids for {t} positions")
        if int(step.token_ids.min()) < 0 or int(step.token_ids.max()) >= self.vocab_size:
            raise InvalidArgument(f"token id outside [0, {self.vocab_size})")
        rows = 0 if step.visual is None else step.visual.shape[0]
        spans = 0 if step.visual_index is None else step.visual_index.numel()
        if rows != spans:
            raise InvalidArgument(f"{spans} visual positions but {rows} visual embedding rows")
        if step.visual is not None:
            if step.visual.shape[1] != self.hidden_size:
                raise InvalidArgument(f"visual_embeds width {step.visual.shape[1]} != {self.hidden_size}")
            if not bool(torch.isfinite(step.visual).all()):
                raise InvalidArgument("visual_embeds hold NaN or infinite values")

    def _validate_hidden_inputs(self, step: Step, t: int) -> None:
        """A later stage's input: the previous stage's [t, H] hidden states, nothing visual."""
        if step.hidden is None:
            raise WrongStage(f"stage {self.model.start}:{self.model.end} takes hidden_states, not token ids")
        if step.hidden.shape != (t, self.hidden_size):
            raise InvalidArgument(f"hidden_states shape {list(step.hidden.shape)} does not match [{t}, {self.hidden_size}]")
        if not bool(torch.isfinite(step.hidden).all()):
            raise InvalidArgument("hidden_states hold NaN or infinite values")
        if step.visual is not None:
            raise WrongStage("visual_embeds go to the first stage only")

    def _validate_sample(self, spec: SampleSpec) -> None:
        if not self.is_last:
            raise WrongStage("only the last stage samples")
        spec.params.validate()
        if spec.top_logprobs < 0:
            raise InvalidArgument("top_logprobs must be >= 0")
        ids = spec.penalty_ids
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise InvalidArgument(f"penalty token id outside [0, {self.vocab_size})")

    def _validate_deepstack(self, step: Step) -> None:
        owned = set(self.model.deepstack_layers)
        extra = sorted(set(step.deepstack) - owned)
        if extra:
            raise WrongStage(
                f"deepstack features for layers {extra}, but stage {self.model.start}:{self.model.end} adds them only after layers {sorted(owned)}"
            )
        rows = 0 if step.visual_index is None else step.visual_index.numel()
        if rows and owned and set(step.deepstack) != owned:
            raise InvalidArgument(f"{rows} visual positions but no deepstack features for layers {sorted(owned - set(step.deepstack))}")
        for layer, feature in step.deepstack.items():
            if feature.shape != (rows, self.hidden_size):
                raise InvalidArgument(f"deepstack features of layer {layer} have shape {list(feature.shape)}, want [{rows}, {self.hidden_size}]")
            if not bool(torch.isfinite(feature).all()):
                raise InvalidArgument(f"deepstack features of layer {layer} hold NaN or infinite values")

    def run(self, steps: list[Step | VlmeshError]) -> list[StepResult]:
        """One batch. An entry that is already an error (undecodable on the wire) is answered
        with it; every other step is validated and admitted alone, and those that pass run."""
        if len(steps) > self.max_batch:
            raise InvalidArgument(f"{len(steps)} steps in one request; this stage takes at most {self.max_batch}")
        results: list[StepResult] = []
        admitted: list[tuple[int, Step, SessionKV]] = []
        seen: set[str] = set()
        for i, step in enumerate(steps):
            if isinstance(step, VlmeshError):
                results.append(StepResult("", error=step))
                continue
            results.append(StepResult(step.session_id))
            try:
                if step.session_id in seen:
                    raise InvalidArgument("two steps of the same session in one request")
                seen.add(step.session_id)
                self.validate(step)
                if step.forks:
                    self.kv.admit_forks(step.start + step.num_tokens, len(step.forks))
                admitted.append((i, step, self.kv.reserve(step.session_id, step.start, step.num_tokens)))
            except VlmeshError as err:
                results[i].error = err
        if admitted:
            with torch.inference_mode():
                try:
                    self._forward(admitted, results)
                except Exception as batch_err:  # noqa: BLE001 - isolate the step that broke the batch
                    if len(admitted) == 1:
                        i, step, _ = admitted[0]
                        results[i].error = _as_error(batch_err)
                        log.exception("step of session %s failed", step.session_id[:40])
                    else:
                        log.warning("a batch of %d steps failed (%s); running them one by one", len(admitted), batch_err)
                        for one in admitted:
                            try:
                                self._forward([one], results)
                            except Exception as err:  # noqa: BLE001
                                results[one[0]].error = _as_error(err)
                                log.exception("step of session %s failed", one[1].session_id[:40])
        for r in results:
            if r.error is None and r.session_id:
                r.cache_length = self.kv.length(r.session_id)
        return results

    def _forward(self, admitted: list[tuple[int, Step, SessionKV]], results: list[StepResult]) -> None:
        steps = [s for _, s, _ in admitted]
        spans, offset = [], 0
        for s in steps:
            spans.append((offset, s.num_tokens))
            offset += s.num_tokens
        batch = BatchKV(self.kv, [kv for _, _, kv in admitted], [s.start for s in steps], spans, [s.return_kv_delta for s in steps])
        dev = self.device
        positions = torch.cat([s.positions for s in steps], dim=1)[:, None, :].to(dev)  # [3, 1, N]
        visual_index = self._visual_index(steps, spans)  # [M] over the batch, or None
        if self.is_first:
            ids = torch.cat([s.token_ids for s in steps]).to(dev)  # type: ignore[misc]
            visual = [s.visual for s in steps if s.visual is not None]
            hidden = self.model.embed(ids, visual_index, torch.cat(visual).to(dev) if visual else None)
        else:
            hidden = torch.cat([s.hidden for s in steps]).to(dev, self.dtype)[None]  # type: ignore[misc]
        visual_mask, deepstack = self._deepstack_inputs(steps, visual_index, offset)
        hidden = self.model(hidden, positions, batch, visual_mask, deepstack)  # [1, N, H]
        tokens: dict[int, list[Sample]] = {}
        if self.is_last:
            want = [j for j, s in enumerate(steps) if s.sample is not None]
            if want:
                last = torch.tensor([spans[j][0] + spans[j][1] - 1 for j in want], device=dev)
                logits = self.model.logits(hidden[0, last])  # [B', V]
                for row, j in enumerate(want):
                    spec = steps[j].sample
                    assert spec is not None  # selected above
                    position = steps[j].start + steps[j].num_tokens
                    params = [spec.params, *(dataclasses.replace(spec.params, seed=seed) for seed in spec.fork_seeds)]
                    tokens[j] = [sample(logits[row], p, position, spec.penalty_ids, spec.top_logprobs) for p in params]
        batch.commit()
        for j, (i, step, _) in enumerate(admitted):
            r = results[i]
            o, n = spans[j]
            r.hidden = None if self.is_last else hidden[0, o : o + n]
            drawn = tokens.get(j, [])
            r.token, r.fork_tokens = (drawn[0], drawn[1:]) if drawn else (None, [])
            r.kv_delta = batch.deltas[j]
            for fork in step.forks:
                self.kv.fork(step.session_id, fork)

    def _visual_index(self, steps: list[Step], spans: list[tuple[int, int]]) -> torch.Tensor | None:
        parts = [s.visual_index + o for s, (o, _) in zip(steps, spans) if s.visual_index is not None and s.visual_index.numel()]
        return torch.cat(parts).to(self.device) if parts else None

    def _deepstack_inputs(
        self, steps: list[Step], visual_index: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor] | None]:
        """The [1, N] visual mask and, per layer, the rows of every step in batch order."""
        if not any(s.deepstack for s in steps) or visual_index is None:
            return None, None
        mask = torch.zeros(1, n, dtype=torch.bool, device=self.device)
        mask[0, visual_index] = True
        deepstack = {}
        for layer in self.model.deepstack_layers:
            rows = [s.deepstack[layer] for s in steps if layer in s.deepstack]
            if rows:
                deepstack[layer] = torch.cat(rows).to(self.device, self.dtype)
        return mask, deepstack

    def restore(self, session_id: str, length: int, entries: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
        layers = self.kv.shape.layers
        if set(entries) != set(layers):
            raise InvalidArgument(f"a restore must bring every owned layer {layers.start}:{layers.stop}, got {sorted(entries)}")
        sh = self.kv.shape
        for layer, (k, v) in entries.items():
            for t in (k, v):
                if t.shape != (sh.kv_heads, length, sh.head_dim):
                    raise InvalidArgument(f"layer {layer}: K/V of shape {list(t.shape)}, want [{sh.kv_heads}, {length}, {sh.head_dim}]")
        self.kv.restore(session_id, length, entries)
        return length


def _as_error(err: Exception) -> VlmeshError:
    return err if isinstance(err, VlmeshError) else VlmeshError(f"{type(err).__name__}: {err}")
