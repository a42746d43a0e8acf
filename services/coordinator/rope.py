"""3-D M-RoPE positions from the model family's own `get_rope_index` (never re-derived)."""

from __future__ import annotations

import torch

from services.common.checkpoint import Checkpoint, build_on_meta

from .visual import Visual, images, videos


class RopeIndex:
    def __init__(self, ckpt: Checkpoint, processor):
        # get_rope_index only reads the config: a meta-device model costs no memory.
        self.model = build_on_meta(ckpt.family.base_model, ckpt.config, torch.float32)
        self.processor = processor

    def positions(self, token_ids: list[int], visuals: list[Visual]) -> tuple[torch.Tensor, int]:
        """Positions [3, L] of the whole sequence and its rope delta (max(pos) + 1 - L)."""
        ids = torch.tensor([token_ids], dtype=torch.long)
        if not visuals:
            # What generate does for text-only input: plain positions, delta 0.
            return torch.arange(len(token_ids)).expand(3, -1).clone(), 0
        imgs, vids = images(visuals), videos(visuals)
        kwargs = {}
        seconds = [v.second_per_grid for v in vids]
        if vids and all(s is not None for s in seconds):
            # Qwen2.5-VL: the processor's second_per_grid_ts, float32 as it hands them to generate.
            kwargs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        mm_types = torch.tensor(self.processor.create_mm_token_type_ids([token_ids]), dtype=torch.int32)
        pos, delta = self.model.get_rope_index(  # type: ignore[operator]
            ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=torch.tensor([v.grid_thw for v in imgs], dtype=torch.long) if imgs else None,
            video_grid_thw=torch.tensor([v.grid_thw for v in vids], dtype=torch.long) if vids else None,
            **kwargs,
        )
        return pos[:, 0, :], int(delta.reshape(-1)[0])
