"""The shared body of every stage's `model.py`: read, check, batch across, split, respond.

No Triton import here: `model.py` hands in `triton_python_backend_utils` (tests hand in a
fake), so this module is importable and tested without a server.

A runner with `device_inputs` (a GPU stage with DLPack on) may get inputs that Triton left
on the GPU (`FORCE_CPU_ONLY_INPUT_TENSORS` "no"): they are read as torch tensors through
DLPack, and its torch outputs leave the same way (`pb_utils.Tensor.from_dlpack`), so
tensors stay on the device between GPU stages. Every other stage reads numpy.
"""

from __future__ import annotations

import json
import struct
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dynemb.errors import InputError
from dynemb.serving.arrays import all_finite, concat, dtype_name, is_tensor, split
from dynemb.serving.byte_tensors import use_fast_bytes
from dynemb.serving.metrics import CacheMetrics, Publisher
from dynemb.specs import StageSpec
from dynemb.stages import Runner, load_runner


class StageAdapter:
    """Subclassed by each `model.py` with `pb_utils` set to the backend's utilities."""

    pb_utils: ModuleType

    def initialize(self, args: dict[str, str]) -> None:
        use_fast_bytes(self.pb_utils)
        directory = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args.get("model_config") or "{}")
        parameters = {
            key: value.get("string_value", "")
            for key, value in config.get("parameters", {}).items()
        }
        device_id = args.get("model_instance_device_id")
        self.runner = load_runner(
            directory,
            parameters=parameters,
            device_id=int(device_id) if args.get("model_instance_kind") == "GPU" else None,
        )
        # A repository built before answers carried versions has no version output in its
        # config (Triton refuses an undeclared output): it serves on, without them.
        declared = {output.get("name") for output in config.get("output", [])}
        version_output = self.runner.spec.version_output.name
        self.version = int(args["model_version"]) if version_output in declared else None
        self.metrics = CacheMetrics(
            self.pb_utils, self.runner.spec.name, args["model_version"], self.runner.caches()
        )
        # The caches' counters are read beside execute: at worst one period late.
        self.publisher = (
            Publisher(self.metrics.update, self.pb_utils.Logger.log_error)
            if self.metrics.caches
            else None
        )
        self.logger = self.pb_utils.Logger
        self.logger.log_info(
            f"{self.runner.spec.name} v{args['model_version']} ready "
            f"(trained={self.runner.manifest.trained}, caches={sorted(self.runner.caches())})"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond(self.pb_utils, requests, self.runner, self.version)

    def finalize(self) -> None:
        if getattr(self, "publisher", None) is not None:  # not if initialize failed first
            self.publisher.stop()
        self.runner = None


def read_inputs(
    pb_utils: ModuleType, request: Any, spec: StageSpec, device_inputs: bool = False
) -> dict[str, np.ndarray]:
    """A request's tensors by name, checked against the spec (Triton checks the ensemble's
    inputs; this guards a stage called directly). With `device_inputs`, a tensor Triton
    left on the GPU is read through DLPack as a torch tensor, where it is."""
    inputs = {}
    # One pass over the request's tensors: pb_utils.get_input_tensor_by_name lists them
    # all again (a Python object each) for every name asked.
    sent = {t.name(): t for t in request.inputs()}
    for tensor in spec.inputs:
        found = sent.get(tensor.name)
        if found is None:
            raise InputError(tensor.name, "missing")
        value = _read(found) if device_inputs else found.as_numpy()
        if dtype_name(value) != tensor.dtype:
            raise InputError(tensor.name, f"dtype {value.dtype}, expected {tensor.dtype}")
        if value.ndim != len(tensor.dims) + 1 or (
            tuple(value.shape[1:]) != tensor.dims and -1 not in tensor.dims
        ):
            raise InputError(tensor.name, f"shape {value.shape[1:]}, expected {tensor.dims}")
        inputs[tensor.name] = value
    sizes = {name: len(value) for name, value in inputs.items()}
    if len(set(sizes.values())) > 1 or 0 in sizes.values():
        raise InputError(", ".join(sizes), f"batch sizes must be equal and positive, got {sizes}")
    return inputs


def _read(found: Any) -> Any:
    if found.is_cpu():
        return found.as_numpy()
    import torch

    return torch.from_dlpack(found.to_dlpack())


def respond(
    pb_utils: ModuleType, requests: list[Any], runner: Runner, version: int | None
) -> list[Any]:
    """One response per request, in order, each with the outputs and `version` (the
    stage's version, per user, in the spec's version output; None: no version output).
    A request with bad input gets its own INVALID_ARG error before it joins the batch;
    the valid ones run together in one call. Bad input that only the call finds and
    that names its batch row (preprocess's text that is not UTF-8) fails that row's
    request with INVALID_ARG, and the others run again together. Should the call fail
    otherwise, each of its requests is run alone, so one request can never fail its
    neighbours: only the one that fails alone gets an error (INTERNAL, logged with its
    traceback, unless it is bad input)."""
    responses: list[Any] = [None] * len(requests)
    valid: list[tuple[int, dict[str, np.ndarray]]] = []
    for i, request in enumerate(requests):
        try:
            inputs = read_inputs(pb_utils, request, runner.spec, runner.device_inputs)
            runner.check(inputs)
        except InputError as exc:
            responses[i] = _error(pb_utils, runner, exc)
            continue
        except struct.error as exc:  # a BYTES tensor whose buffer does not parse
            responses[i] = _error(pb_utils, runner, InputError("BYTES input", f"malformed: {exc}"))
            continue
        except Exception:  # ours, and this request's alone
            responses[i] = _failure(pb_utils, runner)
            continue
        valid.append((i, inputs))
    while True:
        if not valid:
            return responses
        try:
            outputs = _run(runner, valid)
            break
        except InputError as exc:  # bad input only the call finds (preprocess's)
            culprit = _request_of_row(valid, exc.row)
            if culprit is None:
                return _one_by_one(pb_utils, runner, version, valid, responses)
            # It alone gets the error; the others run again together, without it.
            responses[valid[culprit][0]] = _error(pb_utils, runner, exc)
            del valid[culprit]
        except Exception:
            return _one_by_one(pb_utils, runner, version, valid, responses)
    for (i, inputs), out in zip(valid, outputs, strict=True):
        responses[i] = _response(pb_utils, runner, version, inputs, out)
    return responses


def _request_of_row(group: list[tuple[int, dict[str, np.ndarray]]], row: int | None) -> int | None:
    """Which of the group's requests holds batch row `row` of their concatenation."""
    if row is None:
        return None
    sizes = np.cumsum([len(next(iter(inputs.values()))) for _, inputs in group])
    found = int(np.searchsorted(sizes, row, side="right"))
    return found if found < len(group) else None


def _one_by_one(
    pb_utils: ModuleType,
    runner: Runner,
    version: int | None,
    valid: list[tuple[int, dict[str, np.ndarray]]],
    responses: list[Any],
) -> list[Any]:
    """The group's requests each run alone, called while its call's exception is handled
    (it named no request), so that only a request that fails alone gets an error."""
    if len(valid) == 1:
        responses[valid[0][0]] = _failure(pb_utils, runner)
        return responses
    for i, inputs in valid:  # find the culprit: everyone else still gets an answer
        try:
            [out] = _run(runner, [(i, inputs)])
        except Exception:
            responses[i] = _failure(pb_utils, runner)
        else:
            responses[i] = _response(pb_utils, runner, version, inputs, out)
    return responses


class NonFiniteOutputError(RuntimeError):
    """A stage computed NaN or inf from valid inputs: a fault of its version, not the
    caller's (the next stage would otherwise refuse it as bad input)."""


def _response(
    pb_utils: ModuleType, runner: Runner, version: int | None, inputs: dict, outputs: dict
) -> Any:
    out = runner.trim(inputs, outputs)
    for tensor in runner.spec.outputs:
        if tensor.dtype == "FP32" and not all_finite(out[tensor.name]):
            error = NonFiniteOutputError(f"{tensor.name} is not finite")
            pb_utils.Logger.log_error(f"{runner.spec.name}: computed a non-finite {tensor.name}")
            return _error(pb_utils, runner, error, internal=True)
    tensors = [_tensor(pb_utils, t.name, out[t.name], t.dtype) for t in runner.spec.outputs]
    if version is not None:
        users = len(next(iter(out.values())))
        tag = np.full((users, 1), version, np.int64)
        tensors.append(pb_utils.Tensor(runner.spec.version_output.name, tag))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _failure(pb_utils: ModuleType, runner: Runner) -> Any:
    """The response for the exception being handled: bad input found late (a per-request
    runner's own checks) is INVALID_ARG; anything else is ours, INTERNAL, and logged."""
    exc = sys.exc_info()[1]
    if isinstance(exc, InputError):
        return _error(pb_utils, runner, exc)
    pb_utils.Logger.log_error(f"{runner.spec.name}: {traceback.format_exc()}")
    return _error(pb_utils, runner, exc, internal=True)


def _run(runner: Runner, group: list[tuple[int, dict[str, np.ndarray]]]) -> list[dict]:
    """Concatenate the group's users, run once, split the outputs back per request."""
    if len(group) == 1:  # nothing to merge or split
        return [runner(group[0][1])]
    sizes = [len(next(iter(inputs.values()))) for _, inputs in group]
    names = group[0][1].keys()
    batch = {name: concat([inputs[name] for _, inputs in group]) for name in names}
    outputs = runner(batch)
    parts = {name: split(value, sizes) for name, value in outputs.items()}
    return [{name: pieces[j] for name, pieces in parts.items()} for j in range(len(group))]


def _tensor(pb_utils: ModuleType, name: str, value: Any, dtype: str) -> Any:
    """An output tensor: a device tensor leaves by DLPack (no copy), numpy as it is."""
    if is_tensor(value):
        return pb_utils.Tensor.from_dlpack(name, value.contiguous())
    wire = value.astype(object) if dtype == "BYTES" else np.ascontiguousarray(value)
    return pb_utils.Tensor(name, wire)


def _error(pb_utils: ModuleType, runner: Runner, exc: Exception, internal: bool = False) -> Any:
    """Bad input -> INVALID_ARG naming the tensor; a failure of ours -> INTERNAL."""
    if internal:
        kind = f"internal error ({type(exc).__name__}), see the server log"
        message = f"{runner.spec.name}: {kind}: {exc}"
        code = pb_utils.TritonError.INTERNAL
    else:
        message = f"{runner.spec.name}: bad input: {exc}"
        code = pb_utils.TritonError.INVALID_ARG
    error = pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
