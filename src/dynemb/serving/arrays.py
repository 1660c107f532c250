"""A request's tensors as numpy arrays (the CPU path) or as torch tensors on a device (a
GPU stage's inputs and outputs handed over by DLPack): the few operations the adapter,
the checks and the in-process pipeline apply to either, in one place.

torch is never imported here: a tensor is recognised by its type's module, so the CPU
stages (preprocess, retrieve) keep running without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# torch dtype name -> the spec's dtype name (dynemb.specs.NUMPY_DTYPES)
_TORCH_DTYPES = {
    "torch.bool": "BOOL",
    "torch.uint8": "UINT8",
    "torch.int32": "INT32",
    "torch.int64": "INT64",
    "torch.float32": "FP32",
    "torch.float64": "FP64",
}
_NUMPY_DTYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def is_tensor(value: Any) -> bool:
    """A torch tensor (on any device), as opposed to a numpy array."""
    return type(value).__module__.startswith("torch")


def dtype_name(value: Any) -> str:
    """The spec's name of the value's dtype ("FP32", ...; "BYTES" for text, "?" unknown)."""
    if is_tensor(value):
        return _TORCH_DTYPES.get(str(value.dtype), "?")
    if value.dtype.kind in "OSU":
        return "BYTES"
    return _NUMPY_DTYPES.get(value.dtype, "?")


def to_numpy(value: Any) -> np.ndarray:
    """A host copy of a device tensor; numpy arrays pass through."""
    return value.detach().cpu().numpy() if is_tensor(value) else value


def concat(values: Sequence[Any]) -> Any:
    """One array of the requests' values: numpy if all are, else a tensor on the device of
    the first tensor (requests of one batch may differ in where Triton left a tensor)."""
    tensors = [v for v in values if is_tensor(v)]
    if not tensors:
        return np.concatenate(values)
    import torch

    device = tensors[0].device
    return torch.cat([torch.as_tensor(v).to(device) for v in values])


def split(value: Any, sizes: Sequence[int]) -> list[Any]:
    """`value` cut along its first axis into pieces of `sizes`."""
    if is_tensor(value):
        return list(value.split(list(sizes)))
    return np.split(value, np.cumsum(sizes)[:-1])


def all_finite(value: Any) -> bool:
    if is_tensor(value):
        import torch

        return bool(torch.isfinite(value).all())
    return bool(np.isfinite(value).all())
