"""The KV geometry of a language model: what one cached position costs, derived in one place.

The stage sizes its cache with it, the coordinator checks budgets and quotas with it before any
step, and the placement planner sizes stages with it; they must agree to the byte, so none of
them derives it on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVGeometry:
    kv_heads: int  # num_key_value_heads (fewer than the attention heads under GQA)
    head_dim: int

    @classmethod
    def from_text_config(cls, tc: Any) -> KVGeometry:
        """From a HF text config. Some configs name head_dim; the others imply hidden/heads."""
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return cls(tc.num_key_value_heads, head_dim)

    def bytes_per_token(self, layers: int, dtype: torch.dtype | str) -> int:
        """K and V of `layers` decoder layers for one position, at `dtype` (a torch dtype or its
        name as the stages report it, e.g. "bfloat16")."""
        return 2 * layers * self.kv_heads * self.head_dim * itemsize(dtype)


def itemsize(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ValueError(f"not a torch dtype: {dtype!r}")
        dtype = found
    return dtype.itemsize
