"""Triton adapter for the `text_rnn` stage: a GRU over the word pieces of each event.

The artifact in this version directory is loaded by dynemb.serving.runners (checked
against its manifest and the stage spec); reading, checking, batching across requests and
per-request errors live in dynemb.serving.adapter, tested without a server.
"""

import triton_python_backend_utils as pb_utils

from dynemb.serving.adapter import StageAdapter


class TritonPythonModel(StageAdapter):
    pb_utils = pb_utils
