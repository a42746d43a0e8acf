"""The wire Tensor: dtype enum, shape, raw little-endian C-contiguous bytes. Never pickle."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from vlmesh.v1 import tensor_pb2

from .errors import InvalidArgument

# torch.frombuffer over protobuf's immutable bytes warns once per call; the decoded tensors are
# only ever read (layers never write their inputs in place), so the zero-copy view is safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise RuntimeError("vlmesh's wire format is little-endian; big-endian hosts are not supported")

_TO_WIRE = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


def to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    t = t.detach()
    if t.dtype not in _TO_WIRE:
        raise TypeError(f"dtype {t.dtype} has no wire encoding")
    t = t.cpu().contiguous()
    # A bfloat16 tensor has no numpy view; reinterpret its bytes as int16 to serialise.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    data = raw.numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=_TO_WIRE[t.dtype], shape=list(t.shape), data=data)


def from_proto(
    msg: tensor_pb2.Tensor,
    name: str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    """Decode without a copy. Every check raises InvalidArgument naming the field, because these
    tensors come from the network."""
    if msg.dtype not in _FROM_WIRE:
        raise InvalidArgument(f"{name}: unknown dtype enum {msg.dtype}")
    dtype = _FROM_WIRE[msg.dtype]
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InvalidArgument(f"{name}: dtype {str(dtype).removeprefix('torch.')} not accepted (want {allowed})")
    dims = list(msg.shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{name}: negative dimension in shape {dims}")
    if shape is not None:
        if len(dims) != len(shape) or any(w is not None and w != d for w, d in zip(shape, dims)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise InvalidArgument(f"{name}: shape {dims} does not match {want}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(dims)
    if len(msg.data) != numel * itemsize:
        raise InvalidArgument(f"{name}: {len(msg.data)} bytes for shape {dims} of {dtype} (want {numel * itemsize})")
    if numel == 0:
        return torch.empty(dims, dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).view(dims)


def is_set(msg: tensor_pb2.Tensor) -> bool:
    return msg.dtype != tensor_pb2.DTYPE_UNSPECIFIED or len(msg.shape) > 0
