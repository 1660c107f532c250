"""Thin client for the dynemb Triton ensembles (numpy + tritonclient only).

from dynemb_client import Event, InterestClient
with InterestClient("127.0.0.1:8001") as client:
    e_t = client.embed([Event(time=1_700_000_000, text="Toy Story", labels=("genre:Comedy",))])
"""

import logging

from dynemb_client.aio import AsyncInterestClient
from dynemb_client.client import InterestClient
from dynemb_client.errors import (
    ClientInputError,
    PartialUpdateError,
    ServerError,
    ServerInputError,
    ServerUnavailable,
    SessionLostError,
    SessionUpdateError,
)
from dynemb_client.events import Event
from dynemb_client.requests import ModelShape, build_inputs
from dynemb_client.results import Recommendation, Versioned
from dynemb_client.transport import EndpointState

# A library's logs (a retry, an endpoint down) go where the application sends its logs,
# and nowhere when it configured none (they had reached stderr through logging's last
# resort); `dynemb` itself logs warnings to stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AsyncInterestClient",
    "ClientInputError",
    "EndpointState",
    "Event",
    "InterestClient",
    "ModelShape",
    "PartialUpdateError",
    "Recommendation",
    "ServerError",
    "ServerInputError",
    "ServerUnavailable",
    "SessionLostError",
    "SessionUpdateError",
    "Versioned",
    "build_inputs",
]
