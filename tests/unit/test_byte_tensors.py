"""The stub's BYTES reader: the same arrays and errors as the Python backend's own."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import pytriton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import serialize_byte_tensor

from dynemb.serving.byte_tensors import deserialize_bytes_tensor

from . import fake_pb_utils
from .test_adapter import load_model

_BACKEND_UTILS = (
    Path(pytriton.__file__).parent
    / "tritonserver"
    / "backends"
    / "python"
    / "triton_python_backend_utils.py"
)


def _triton_utils():
    """The `triton_python_backend_utils` the bundled tritonserver's stubs import (numpy,
    json and struct only), loaded under another name beside the tests' fake."""
    spec = importlib.util.spec_from_file_location("triton_utils_reference", _BACKEND_UTILS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _triton_utils().deserialize_bytes_tensor


def _wire(elements: list[bytes]) -> np.ndarray:
    """What the stub hands the reader: the client's serialization as a uint8 array."""
    if not elements:
        return np.zeros(0, np.uint8)
    tensor = np.empty(len(elements), dtype=np.object_)
    tensor[:] = elements
    return np.frombuffer(serialize_byte_tensor(tensor).item(), np.uint8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=60))
def test_it_reads_what_the_backend_reads(elements):
    wire = _wire(elements)
    ours, theirs = deserialize_bytes_tensor(wire), REFERENCE(wire)
    assert ours.dtype == theirs.dtype == np.object_
    assert ours.shape == theirs.shape == (len(elements),)
    assert list(ours) == list(theirs) == elements
    assert all(type(value) is bytes for value in ours)


def test_it_reads_a_users_padded_history_and_bytes_objects():
    texts = ["Toy Story (1995)", "Amélie", ""] + [""] * 47
    labels = np.full((50, 8), b"", dtype=np.object_)
    labels[:3, :2] = [[b"genre:Comedy", b"rating:4"]] * 3
    for tensor in (np.array([t.encode() for t in texts], dtype=np.object_), labels):
        wire = serialize_byte_tensor(tensor).item()
        for given_as in (wire, np.frombuffer(wire, np.uint8), memoryview(wire)):
            ours = deserialize_bytes_tensor(given_as)
            assert list(ours) == list(REFERENCE(np.frombuffer(wire, np.uint8)))
            assert list(ours.reshape(tensor.shape).ravel()) == list(tensor.ravel())


@pytest.mark.parametrize(
    "wire",
    [
        b"\x05\x00\x00\x00abc",  # an element longer than what is left
        b"\x01\x00\x00\x00a\x02\x00",  # a length cut short
    ],
)
def test_a_malformed_buffer_fails_as_it_does_in_the_backend(wire):
    array = np.frombuffer(wire, np.uint8)
    with pytest.raises(struct.error):
        REFERENCE(array)
    with pytest.raises(struct.error):
        deserialize_bytes_tensor(array)


def test_a_stage_model_installs_it_when_it_starts(repo):
    fake_pb_utils.deserialize_bytes_tensor = REFERENCE
    load_model(repo, "preprocess")
    assert fake_pb_utils.deserialize_bytes_tensor is deserialize_bytes_tensor
