"""dynemb.bench.context: recorded context, loopback-only targets, batching statistics."""

from __future__ import annotations

import pytest

from dynemb.bench import context as bench_context
from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS


@pytest.fixture(scope="module")
def common():
    return bench_context


def _snapshot(**models: tuple[int, int, int, int]) -> dict:
    """A get_inference_statistics(as_json=True) answer: (inferences, executions, queue ns,
    compute ns) per model; counters travel as strings, as Triton sends them."""
    return {
        "model_stats": [
            {
                "name": name,
                "version": "1",
                "inference_count": str(inf),
                "execution_count": str(exe),
                "inference_stats": {
                    "queue": {"count": str(inf), "ns": str(queue_ns)},
                    "compute_infer": {"count": str(exe), "ns": str(infer_ns)},
                },
            }
            for name, (inf, exe, queue_ns, infer_ns) in models.items()
        ]
    }


def test_context_records_what_a_result_needs(common):
    ctx = common.collect_context(["benchmarks/swap_under_load.py", "--seconds", "30"])
    assert "benchmarks/swap_under_load.py --seconds 30" in ctx.command
    assert ctx.git_commit == "unknown" or len(ctx.git_commit) == 40
    assert ctx.uncommitted is None or not [
        p for p in ctx.uncommitted if p.startswith("benchmarks/results/")
    ]  # results are outputs, not code the numbers depend on
    ctx.finish()
    assert len(ctx.load_average_end) == 3 and "at the end" in common.context_markdown(ctx)
    assert ctx.machine["cpu_count"] and ctx.machine["platform"]
    assert len(ctx.load_average) == 3
    assert ctx.versions["python"].count(".") == 2 and "torch" in ctx.versions
    assert set(ctx.stages) == {*STAGE_SPECS, *ENSEMBLE_SPECS}
    for name, spec in STAGE_SPECS.items():
        settings = ctx.stages[name]
        assert settings.instances == spec.instances
        assert settings.max_batch_size == spec.max_batch_size
        assert settings.max_queue_delay_us == spec.max_queue_delay_us
    assert "synthetic" in ctx.data
    recorded = ctx.as_dict()
    assert recorded["command"] == ctx.command and recorded["settings_mismatch"] == []


def test_busy_machine_is_warned_and_recorded(common):
    ctx = common.collect_context(["x.py"])
    ctx.load_average = (0.4, 0.3, 0.2)
    assert ctx.load_warning() is None and "WARNING" not in common.context_markdown(ctx)
    ctx.load_average = (3.5, 2.0, 1.0)
    assert "3.50" in ctx.load_warning()
    assert ctx.as_dict()["load_warning"] == ctx.load_warning()
    assert "WARNING" in common.context_markdown(ctx)


def test_cpu_used_by_other_processes_during_the_run_is_measured_and_warned(common):
    """A process the benchmark did not start, busy during the run, shows as other cores
    (the load average at the start cannot see it); the benchmark's own waited-for
    children do not. What the machine's other processes use anyway is measured first over
    as long a window, so that the test holds on a machine that is not quiet."""
    import subprocess
    import sys
    import time

    ctx = common.collect_context(["x.py"])
    started = time.perf_counter()
    own = subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
    assert own.returncode == 0
    ctx.finish()
    background = common.collect_context(["x.py"])
    time.sleep(time.perf_counter() - started)
    background.finish()
    assert ctx.others_cores is not None and background.others_cores is not None
    assert ctx.others_cores < background.others_cores + 0.5  # the child (a whole core) is not
    ctx = common.collect_context(["x.py"])
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        ctx.finish()  # `other` runs on, not waited for: not the benchmark's
    finally:
        other.kill()
        other.wait()
    assert ctx.others_cores > common.BUSY_OTHERS_CORES
    assert "other processes used" in ctx.usage_warning()
    assert ctx.as_dict()["usage_warning"] == ctx.usage_warning()
    assert "during the run" in common.context_markdown(ctx)


def test_served_settings_read_from_model_configs(common):
    configs = {
        "text_rnn": {
            "config": {
                "max_batch_size": 32,
                "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
                "dynamic_batching": {"max_queue_delay_microseconds": "500"},
            }
        },
        "user_interest": {"config": {"max_batch_size": 32, "platform": "ensemble"}},
    }
    served = common.served_settings(configs)
    assert served["text_rnn"] == common.StageSettings(2, 32, 500)
    assert served["user_interest"] == common.StageSettings(1, 32, None)
    ctx = common.collect_context(["x.py"])
    ctx.served = served
    assert ctx.settings_mismatch() == ["text_rnn"]  # specs say 1 instance, 200 µs


def test_stage_stats_average_batch_from_two_snapshots(common):
    before = _snapshot(text_rnn=(10, 10, 0, 0), llm_encoder=(10, 10, 0, 0))
    after = _snapshot(
        text_rnn=(50, 20, 40_000_000, 100_000_000),  # 40 users in 10 batches
        llm_encoder=(10, 10, 0, 0),  # idle in between: left out
        user_interest=(40, 40, 0, 0),  # first seen in the second snapshot
    )
    stats = common.stage_stats(before, after)
    assert list(stats) == ["text_rnn", "user_interest"]  # execution order of the specs
    assert stats["text_rnn"].avg_batch == pytest.approx(4.0)
    assert stats["text_rnn"].queue_ms == pytest.approx(1.0)  # 40 ms over 40 requests
    assert stats["text_rnn"].compute_ms == pytest.approx(10.0)  # 100 ms over 10 batches
    assert "| text_rnn | 40 | 10 | 4.00 |" in common.stats_markdown(stats)


@pytest.mark.parametrize("host", ["127.0.0.1:8001", "localhost:8001", "[::1]:8001", "127.0.0.2:1"])
def test_loopback_targets_accepted(common, host):
    assert common.loopback_target(host) == host


@pytest.mark.parametrize(
    "host",
    [None, "", "10.0.0.5:8001", "0.0.0.0:8001", "example.com:8001", "127.0.0.1", "127.0.0.1:x"],
)
def test_other_targets_refused(common, host):
    with pytest.raises(ValueError):
        common.loopback_target(host)
