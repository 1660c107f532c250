"""A stand-in for triton_python_backend_utils, enough to drive model.py without a server."""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class Tensor:
    """A tensor in host memory, or (`from_dlpack` of a torch tensor, `device=True`) one that
    stands for a tensor Triton keeps on a GPU: only DLPack reads it then, as in the backend."""

    dlpack_outputs: ClassVar[list[str]] = []  # names of the tensors made by from_dlpack

    def __init__(self, name: str, value, device: bool = False) -> None:
        self._name, self._value, self._device = name, value, device

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return not self._device

    def as_numpy(self) -> np.ndarray:
        if self._device:
            raise RuntimeError(f"{self._name} is on the GPU: read it with to_dlpack")
        return self._value.numpy() if hasattr(self._value, "numpy") else self._value

    def to_dlpack(self):
        import torch

        value = self._value if hasattr(self._value, "numpy") else torch.from_numpy(self._value)
        return torch.utils.dlpack.to_dlpack(value)

    @classmethod
    def from_dlpack(cls, name: str, value) -> Tensor:
        if not value.is_contiguous():
            raise ValueError("from_dlpack takes C-contiguous tensors only")
        cls.dlpack_outputs.append(name)
        return cls(name, value)


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = range(5)
    UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(5, 8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None) -> None:
        self.output_tensors = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error

    def has_error(self) -> bool:
        return self.error is not None


class InferenceRequest:
    def __init__(self, tensors: dict[str, np.ndarray], on_device: tuple[str, ...] = ()) -> None:
        """`on_device`: inputs that arrive as GPU tensors (FORCE_CPU_ONLY_INPUT_TENSORS "no")."""
        self.tensors = {
            name: Tensor(name, value, device=name in on_device) for name, value in tensors.items()
        }

    def inputs(self) -> list[Tensor]:
        return list(self.tensors.values())


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.tensors.get(name)


class Logger:
    messages: ClassVar[list[str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.messages.append(message)

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.messages.append(message)


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str]) -> None:
        self.family, self.labels, self.value = family, labels, 0.0

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value


class MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"
    created: ClassVar[list[Metric]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind

    def Metric(self, labels: dict[str, str]) -> Metric:  # noqa: N802 (pb_utils' spelling)
        metric = Metric(self, labels)
        MetricFamily.created.append(metric)
        return metric
