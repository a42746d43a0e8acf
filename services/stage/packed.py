"""A stage's linear weights packed once at load for the CPU's GEMM library, where that changes no bit.

transformers' `nn.Linear` calls `F.linear`. For bfloat16 on a CPU whose oneDNN has bf16 kernels
that is a oneDNN matmul, which packs the weight into its blocked layout on every call: for a
decode step, where each weight is read once for a handful of rows, the packing is a large part
of the call. `torch.ops.mkldnn._reorder_linear_weight` packs it once (what inductor's freezing
pass does for a frozen graph) and `_linear_pointwise` runs the same primitive on it.

Whether `F.linear` reaches that primitive depends on the CPU and the dtype (float32 goes to
MKL's sgemm; a CPU without bf16 support computes bfloat16 another way), so equality is not
assumed: at load every distinct weight shape is run both ways on its own weight, over a spread
of row counts, and the stage packs only if every output is bitwise equal. Otherwise the layers
keep `nn.Linear` and say why in the log. Greedy output therefore stays what `generate()` makes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Row counts the load-time check runs: decode batches and odd sizes (every linear), prompt chunks
# (the layers' linears; the lm_head only ever sees one row per sampled session).
DECODE_ROWS = (1, 2, 3, 5, 8, 13, 16, 31, 64)
PROMPT_ROWS = (*DECODE_ROWS, 129, 517)


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight packed for oneDNN (an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed  # mkldnn layout, [out, in] logically; not a Parameter (nothing trains or saves it)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)

    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


@dataclass(frozen=True)
class Packing:
    """What `pack_linears` did, for the log and GetInfo."""

    packed: int  # linears now PackedLinear
    reason: str  # why not, when packed == 0


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _bitwise_equal(linear: nn.Linear, packed: torch.Tensor, rows_to_try: tuple[int, ...], generator: torch.Generator) -> bool:
    w, b = linear.weight, linear.bias
    for rows in rows_to_try:
        x = torch.randn(1, rows, linear.in_features, generator=generator).to(w.dtype)
        with torch.inference_mode():
            if not torch.equal(F.linear(x, w, b), _packed_linear(x, packed, b)):
                return False
    return True


def pack_linears(root: nn.Module, device: torch.device, dtype: torch.dtype, decode_only: frozenset[str] = frozenset()) -> Packing:
    """Replace every plain `nn.Linear` below root by a PackedLinear, if packing is bitwise equal
    to F.linear for each of their shapes on this machine (all or none). `decode_only`: names of
    linears that only ever see a few rows (the lm_head: one per sampled session), checked at
    decode row counts only. A linear whose weight another module shares (a tied lm_head on a
    single stage: the embedding looks rows up in it) is packed too: the packed copy is memory of
    its own, as the last stage's lm_head is in a split mesh, and the shared weight stays."""
    if device.type != "cpu":
        return Packing(0, f"device {device} (packing is for the CPU's oneDNN)")
    if dtype != torch.bfloat16:
        return Packing(0, f"{dtype} (F.linear does not run oneDNN's packed kernel for it)")
    if not torch.backends.mkldnn.is_available():
        return Packing(0, "this torch has no oneDNN")
    targets = [
        (parent, f"{prefix}.{name}" if prefix else name, name, child)
        for prefix, parent in root.named_modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    if not targets:
        return Packing(0, "no plain linear layers")
    # Check each distinct shape on its first linear (keeping that packed copy), then swap one
    # linear at a time. The originals are the checkpoint's mmap pages, not anonymous memory, so
    # the packed copies are the only memory this adds (the pages stay as clean page cache).
    generator = torch.Generator().manual_seed(0)
    checked: set[tuple[int, int, bool, bool]] = set()
    done: dict[int, torch.Tensor] = {}  # id(linear) -> its packed weight, for the ones checked
    for _, qualified, _, linear in targets:
        short = qualified in decode_only
        key = (linear.out_features, linear.in_features, linear.bias is not None, short)
        if key in checked:
            continue
        try:
            p = _pack(linear.weight.detach())
        except RuntimeError as err:  # e.g. a CPU oneDNN has no bf16 kernels for
            return Packing(0, f"oneDNN refused to pack: {str(err).splitlines()[0]}")
        if not _bitwise_equal(linear, p, DECODE_ROWS if short else PROMPT_ROWS, generator):
            return Packing(0, f"a packed {key[0]}x{key[1]} linear is not bitwise equal to F.linear on this CPU")
        checked.add(key)
        done[id(linear)] = p
    for parent, _, name, linear in targets:
        setattr(parent, name, PackedLinear(linear, done.pop(id(linear)) if id(linear) in done else _pack(linear.weight.detach())))
    return Packing(len(targets), "")
