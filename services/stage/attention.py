"""How a batch of sessions attends over its KV: two numerics, chosen per stage.

A stage runs the tokens of several sessions side by side as one sequence ([1, N, H]): the
projections, norms and MLPs are per token, so they do not care whose token is whose. Attention
does. Both functions here are registered with transformers as attention implementations and both
call transformers' own `sdpa_attention_forward`; they differ in how many times.

`exact` ("vlmesh", the default) runs it once per session, on that session's queries and a view of
its preallocated K/V buffer, with the arguments `generate()` would use for it alone:

- a prompt from position 0: no mask, causal (the flash kernel, as in generate's prefill);
- one new token: no mask over the whole cache (generate's decode);
- a prompt chunk after earlier positions: a causal mask offset by the cached length (generate
  never does this; it is what chunked prefill needs).

The kernel then sees exactly the numbers it sees in `generate()` (a view, not a copy: the buffer
is [kv_heads, capacity, head_dim] and the view stops at the session's length), so greedy output
stays token-exact. What it costs: one small attention call per session per layer.

`fast` ("vlmesh-batched") runs it once per layer per micro-batch: queries padded to the longest
step, K/V padded to the longest cache, a boolean mask (causal, offset by each session's cached
length, padding off). Measured on CPU (bench/bench_profile.py --bitwise, bench/results/): this is
not bitwise equal to the per-session call in float32 or bfloat16. Zero-padded keys change the
length of the kernel's reductions, and the CPU flash kernel splits a lone session's decode across
threads differently from a batch's, so the last bits differ. Greedy output can then part from
`generate()`; that is why it is a mode of its own, with its agreement with `exact` measured
(tests/test_numerics.py). On a GPU it is one kernel launch per layer where `exact` makes B. A
micro-batch of one session takes the exact path (it is one call already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

if TYPE_CHECKING:
    from .kv_cache import BatchKV

NAME = "vlmesh"  # exact: per session
BATCHED_NAME = "vlmesh-batched"  # fast: one padded, masked call per layer per micro-batch
NUMERICS = {"exact": NAME, "fast": BATCHED_NAME}  # --numerics -> attention implementation


def batch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, N, D]: the batch's new tokens, side by side
    key: torch.Tensor,  # [1, kv_heads, N, D] (already written to the cache; unused here)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    vlmesh_batch: BatchKV,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer: int = module.layer_idx  # type: ignore[assignment]
    outs = []
    for i, (offset, count) in enumerate(vlmesh_batch.spans):
        q = query[:, :, offset : offset + count]
        k, v = vlmesh_batch.view(i, layer)  # [1, kv_heads, past + count, D]
        past = k.shape[2] - count
        mask = None
        if past and count > 1:  # a chunk after cached positions: causal, shifted by `past`
            rows = torch.arange(count, device=q.device)[:, None] + past
            mask = (torch.arange(past + count, device=q.device)[None, :] <= rows)[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=True)
        outs.append(out)  # [1, count, heads, D]
    return torch.cat(outs, dim=1), None


@dataclass(frozen=True)
class PaddedLayout:
    """Where a micro-batch's tokens sit in the padded [B, T] layout of the batched call; built
    once per forward pass (it depends on the steps, not on the layer)."""

    batch: int  # B sessions
    steps: int  # T: the longest step's token count
    lengths: tuple[int, ...]  # [B] cached + new positions of each session after the step
    gather: torch.Tensor  # [B*T] int64: the batch row of each padded query (padding repeats row 0)
    scatter: torch.Tensor  # [N] int64: the padded row of each of the batch's tokens
    mask: torch.Tensor  # [B, 1, T, Lmax] bool: True where a query may attend

    @staticmethod
    def of(starts: list[int], spans: list[tuple[int, int]], device: torch.device) -> PaddedLayout:
        b = len(spans)
        t = max(count for _, count in spans)
        lengths = tuple(start + count for start, (_, count) in zip(starts, spans))
        lmax = max(lengths)
        gather = torch.zeros(b * t, dtype=torch.long)
        scatter = torch.empty(sum(count for _, count in spans), dtype=torch.long)
        mask = torch.zeros(b, 1, t, lmax, dtype=torch.bool)
        keys = torch.arange(lmax)
        for i, (start, (offset, count)) in enumerate(zip(starts, spans)):
            gather[i * t : i * t + count] = torch.arange(offset, offset + count)
            scatter[offset : offset + count] = torch.arange(i * t, i * t + count)
            rows = torch.arange(count)[:, None] + start  # query j sits at position start + j
            mask[i, 0, :count] = keys[None, :] <= rows
            mask[i, 0, count:, 0] = True  # padded queries attend somewhere (no NaN); their rows are dropped
        return PaddedLayout(b, t, lengths, gather.to(device), scatter.to(device), mask.to(device))


def batched_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, N, D]
    key: torch.Tensor,  # [1, kv_heads, N, D] (already in the cache)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    vlmesh_batch: BatchKV,
    vlmesh_layout: PaddedLayout,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    lay = vlmesh_layout
    if lay.batch == 1:  # one session: its own call is already one per layer, and exact
        return batch_attention(module, query, key, value, attention_mask, vlmesh_batch=vlmesh_batch, dropout=dropout, scaling=scaling)
    layer: int = module.layer_idx  # type: ignore[assignment]
    heads, d = query.shape[1], query.shape[3]
    q = query[0].index_select(1, lay.gather).view(heads, lay.batch, lay.steps, d).transpose(0, 1)  # [B, heads, T, D]
    views = [vlmesh_batch.view(i, layer) for i in range(lay.batch)]  # [1, kv_heads, L_i, D] each
    # pad_sequence pads the sequence dimension: [L_i, kv_heads, D] -> [B, Lmax, kv_heads, D].
    k = torch.nn.utils.rnn.pad_sequence([kv[0][0].transpose(0, 1) for kv in views], batch_first=True).transpose(1, 2)
    v = torch.nn.utils.rnn.pad_sequence([kv[1][0].transpose(0, 1) for kv in views], batch_first=True).transpose(1, 2)
    out, _ = sdpa_attention_forward(module, q, k, v, lay.mask, dropout=dropout, scaling=scaling, is_causal=True)  # [B, T, heads, D]
    return out.reshape(lay.batch * lay.steps, heads, d).index_select(0, lay.scatter)[None], None  # [1, N, heads, D]


AttentionInterface.register(NAME, batch_attention)
AttentionInterface.register(BATCHED_NAME, batched_attention)
