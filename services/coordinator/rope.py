"""3-D M-RoPE positions from the model family's own `get_rope_index` (never re-derived)."""

from __future__ import annotations

import torch

from services.common.checkpoint import Checkpoint, build_on_meta


class RopeIndex:
    def __init__(self, ckpt: Checkpoint, processor):
        # get_rope_index only reads the config: a meta-device model costs no memory.
        self.model = build_on_meta(ckpt.family.base_model, ckpt.config, torch.float32)
        self.processor = processor

    def positions(
        self,
        token_ids: list[int],
        image_grids: list[tuple[int, int, int]],
        video_grids: list[tuple[int, int, int]] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Positions [3, L] of the whole sequence and its rope delta (max(pos) + 1 - L)."""
        video_grids = video_grids or []
        ids = torch.tensor([token_ids], dtype=torch.long)
        if not image_grids and not video_grids:
            # What generate does for text-only input: plain positions, delta 0.
            return torch.arange(len(token_ids)).expand(3, -1).clone(), 0
        mm_types = torch.tensor(self.processor.create_mm_token_type_ids([token_ids]), dtype=torch.int32)
        pos, delta = self.model.get_rope_index(
            ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=torch.tensor(image_grids, dtype=torch.long) if image_grids else None,
            video_grid_thw=torch.tensor(video_grids, dtype=torch.long) if video_grids else None,
        )
        return pos[:, 0, :], int(delta.reshape(-1)[0])
