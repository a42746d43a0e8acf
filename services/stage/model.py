"""A contiguous slice of the language model, built from the family's own transformers classes.

Nothing here re-implements model math: the decoder layers, rotary embedding, norm and (Qwen3-VL)
DeepStack injection are transformers' own; this file only slices them, loads their weights and
calls them in the order the family's text model does."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from services.common.checkpoint import Checkpoint, build_on_meta, load_weights

from . import attention, packed, quant  # attention: registers the attentions the layers are built with
from .kv_cache import BatchKV

log = logging.getLogger(__name__)


class StageModel(nn.Module):
    layers: nn.ModuleList
    embed_tokens: nn.Module | None  # first stage
    norm: nn.Module | None  # last stage
    lm_head: nn.Module | None  # last stage
    rotary_emb: nn.Module
    _deepstack_process: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor] | None

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device = torch.device("cpu"),
        quantize: str = "auto",
        numerics: str = "exact",
        prepack: bool = True,
    ):
        super().__init__()
        tc = ckpt.text_config
        n = tc.num_hidden_layers
        if not (0 <= start < end <= n):
            raise ValueError(f"layer range {start}:{end} is not inside the model's 0:{n}")
        self.start, self.end, self.num_layers = start, end, n
        self.is_first, self.is_last = start == 0, end == n
        # The layers attend through a "vlmesh" attention (attention.py): per session over its KV in
        # place (exact), or one padded call per micro-batch (fast). A copy, so the checkpoint's own
        # config keeps sdpa for anyone else.
        if numerics not in attention.NUMERICS:
            raise ValueError(f"numerics must be one of {sorted(attention.NUMERICS)}, got {numerics!r}")
        self.numerics = numerics
        tc = copy.deepcopy(tc)
        tc._attn_implementation = attention.NUMERICS[numerics]
        self.config = tc
        # Build the whole text model on the meta device (no memory), keep our slice, then load
        # only our tensors into it: the layers keep their global layer_idx for the cache.
        full = build_on_meta(ckpt.family.text_model, tc, dtype)
        self.layers = nn.ModuleList(cast(nn.ModuleList, full.layers)[start:end])
        self.embed_tokens = full.embed_tokens if self.is_first else None
        self.norm = full.norm if self.is_last else None
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False, device="meta", dtype=dtype) if self.is_last else None
        self.rotary_emb = full.rotary_emb
        # Qwen3-VL: after decoder layer i < k the text model adds the i-th DeepStack feature at the
        # visual positions with its own _deepstack_process (it touches no weights: the meta-built
        # module's bound method serves).
        k = ckpt.family.deepstack_layers(ckpt.config)
        self.deepstack_layers = tuple(i for i in range(start, end) if i < k)
        self._deepstack_process = full._deepstack_process if k else None

        # Only the owned layers' tensors are read: a MoE stage loads the experts of its layers only.
        state = ckpt.read(self._select(ckpt.tied), dtype, desc=f"stage {start}:{end} weights", int8=quantize != "none")
        if self.is_first and self.is_last and ckpt.tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]  # one stage: share, as HF ties
        # int8 W8A8 decoder-layer linears where the checkpoint has them or --quantize asks ("none"/"w8a8-int8").
        self.quantization = quant.prepare_stage(self, state, quantize, dtype, ckpt.config)
        load_weights(self, state, f"{ckpt.path} stage {start}:{end}", ckpt.family.transposed_on_load)
        del state  # no references left to the loaded tensors but the modules' own
        self.device = device
        self.to(device).eval()
        # Float linears packed for oneDNN once, if that is bitwise equal to F.linear here (packed.py).
        self.packing = (
            packed.pack_linears(self, device, dtype, decode_only=frozenset({"lm_head"})) if prepack else packed.Packing(0, "--prepack false")
        )
        if self.packing.packed:
            log.info("stage %d:%d: %d linears prepacked for oneDNN (bitwise equal to F.linear on this CPU)", start, end, self.packing.packed)
        else:
            log.info("stage %d:%d: linears not prepacked: %s", start, end, self.packing.reason)

    def _select(self, tied: bool):
        def select(part: str, name: str) -> str | None:
            if part == "text":
                if name.startswith("layers."):
                    idx, rest = name.split(".", 2)[1:]
                    i = int(idx)
                    return f"layers.{i - self.start}.{rest}" if self.start <= i < self.end else None
                if name == "embed_tokens.weight":
                    # Tied checkpoints (Qwen2-VL-2B) store no lm_head: the last stage reads the embedding.
                    if self.is_first:
                        return "embed_tokens.weight"
                    return "lm_head.weight" if self.is_last and tied else None
                if name.startswith("norm.") and self.is_last:
                    return name
            if part == "head" and self.is_last and not tied:
                return f"lm_head.{name}"
            return None

        return select

    def weight_bytes(self) -> int:
        # A single tied stage's unpacked lm_head is a second Parameter over the embedding's storage:
        # count memory, not parameters (a packed one is a copy of its own, counted once).
        params = {p.data_ptr(): p.numel() * p.element_size() for p in self.parameters()}
        return sum(params.values()) + sum(m.weight_bytes() for m in self.modules() if isinstance(m, packed.PackedLinear))

    def embed(self, token_ids: torch.Tensor, visual_index: torch.Tensor | None, visual: torch.Tensor | None) -> torch.Tensor:
        """token ids [N] -> [1, N, H], visual rows [M, H] written over positions visual_index [M]
        (the values transformers' masked_scatter writes; the coordinator says where)."""
        assert self.embed_tokens is not None  # the backend calls this on the first stage only
        h = self.embed_tokens(token_ids[None])
        if visual is not None and visual_index is not None:
            h[0, visual_index] = visual.to(h.dtype)
        return h

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        batch: BatchKV,
        visual_mask: torch.Tensor | None = None,
        deepstack: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden [1, N, H] (the batch's sessions side by side), position_ids [3, 1, N] -> [1, N, H]
        after this stage's layers. deepstack: global layer -> [M, H] rows added after that layer
        at the M True positions of visual_mask [1, N], in order (the text model's own
        _deepstack_process)."""
        position_embeddings = self.rotary_emb(hidden, position_ids)
        extra: dict[str, attention.PaddedLayout] = {}
        if self.numerics == "fast":  # the padded layout is the same for every layer: built once
            extra["vlmesh_layout"] = attention.PaddedLayout.of(batch.starts, batch.spans, hidden.device)
        for i, layer in enumerate(self.layers):
            hidden = layer(
                hidden,
                attention_mask=None,
                position_embeddings=position_embeddings,
                past_key_values=batch,
                use_cache=True,
                vlmesh_batch=batch,
                **extra,
            )
            feature = deepstack.get(self.start + i) if deepstack else None
            if feature is not None and self._deepstack_process is not None:
                hidden = self._deepstack_process(hidden, visual_mask, feature)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] (each sampled session's last position) -> [B, V] float32 logits, as `generate`
        computes them from the last position."""
        assert self.lm_head is not None and self.norm is not None  # the backend calls this on the last stage only
        return self.lm_head(self.norm(hidden[:, None, :]))[:, -1, :].to(torch.float32)
