"""The supervisor's Prometheus endpoint frees its port when stopped: `dynemb serve
--replicas N` starts a dead replica again with a new supervisor on the same port (it
crashed with 'Address already in use' before)."""

from __future__ import annotations

import urllib.request

import pytest

from dynemb.server import free_port
from dynemb.supervisor import _Metrics


def test_metrics_port_is_free_again_after_close() -> None:
    port = free_port()
    for _ in range(2):
        metrics = _Metrics(port, "127.0.0.1")
        metrics.recovered("text_rnn", ok=True)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'dynemb_stage_recoveries_total{outcome="ok",stage="text_rnn"} 1.0' in text
        metrics.close()


def test_a_taken_metrics_port_is_a_one_line_error():
    import socket

    from dynemb.errors import DynembError
    from dynemb.supervisor import _Metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DynembError, match="--supervisor-port"):
            _Metrics(port, "127.0.0.1")


def test_a_stage_whose_probes_time_out_while_it_keeps_working_is_busy_not_hung():
    """A request of 32 users' large images holds preprocess for 20 s and more; the probes
    queued behind two such requests timed out twice and the supervisor restarted a stage
    that was working (and dropped its caches). Hung is two timeouts with no execution
    finished between their probe rounds."""
    from dynemb.supervisor import HangWatch

    watch = HangWatch()
    for executions in (10, 14, 19, 25):  # each round it finished more: busy, never hung
        watch.executions = {"preprocess": executions}
        assert not watch.timed_out("preprocess")
    watch.executions = {"preprocess": 25}  # nothing finished since the last round: hung
    assert watch.timed_out("preprocess")

    watch.answered("preprocess")
    watch.executions = {}  # the server could not say: two timeouts are a hang, as before
    assert not watch.timed_out("text_rnn") and watch.timed_out("text_rnn")
    watch.answered("text_rnn")
    assert not watch.timed_out("text_rnn")  # an answer starts the count anew
