"""How a batch of sessions attends over its KV in place.

A stage runs the tokens of several sessions side by side as one sequence ([1, N, H]): the
projections, norms and MLPs are per token, so they do not care whose token is whose. Attention
does, so this function, registered with transformers as the attention implementation "vlmesh",
runs transformers' own `sdpa_attention_forward` once per session, on that session's queries and
a view of its preallocated K/V buffer, with the arguments `generate()` would use for it alone:

- a prompt from position 0: no mask, causal (the flash kernel, as in generate's prefill);
- one new token: no mask over the whole cache (generate's decode);
- a prompt chunk after earlier positions: a causal mask offset by the cached length (generate
  never does this; it is what chunked prefill needs).

The kernel then sees exactly the numbers it sees in `generate()` (a view, not a copy: the buffer
is [kv_heads, capacity, head_dim] and the view stops at the session's length), so greedy output
stays token-exact. What it costs: one small attention call per session per layer instead of one
padded batched call. On a CPU that is nothing next to the projections; on a GPU it is B kernel
launches per layer, which a paged-attention kernel would fold into one. What it saves: nothing
is padded or copied; the old batched decode re-concatenated every session's whole cache for
every layer on every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

if TYPE_CHECKING:
    from .kv_cache import BatchKV

NAME = "vlmesh"


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


AttentionInterface.register(NAME, batch_attention)
