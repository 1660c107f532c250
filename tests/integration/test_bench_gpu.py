"""The GPU benchmark's dry run (`dynemb bench-gpu --device cpu --dry-run`): every phase of
the prepared GPU command runs here on the CPU at tiny sizes against a real tritonserver
serving the gpu variant (device cpu), with and without the DLPack hand-over, and ends
inside its budget. It measures nothing about GPUs; it keeps the command that a session
with a lent GPU runs once (benchmarks/gpu/README.md) from rotting in between."""

from __future__ import annotations

import json

from dynemb import stages
from dynemb.bench.gpu import GpuBenchOptions, run_gpu_bench

NEURAL = [name for name in stages.NAMES if stages.get(name).neural]


def test_gpu_bench_dry_run_runs_every_phase_within_its_budget(tmp_path):
    options = GpuBenchOptions.dry_run(tmp_path / "out")
    result, context = run_gpu_bench(options, say=lambda line: None)

    assert result.skipped == [], result.skipped
    assert result.dry_run and result.total_s < options.budget_s
    assert set(result.phase_s) == {"build", "parity", "inprocess", "served", "served-no-dlpack"}

    # E_t of every probe user: device runners in-process, and served both ways, against
    # the CPU fp32 pipeline (on this CPU, fp32 everywhere: equal within 1e-4).
    where = {p.where for p in result.parity}
    assert where == {"in-process", "served (dlpack=True)", "served (dlpack=False)"}
    for p in result.parity:
        assert p.passed and p.users == options.probes and p.max_abs_diff <= 1e-4, p

    assert [p.batch for p in result.inprocess] == list(options.batches)
    assert all(p.users_per_s > 0 for p in result.inprocess)
    assert result.preprocess_users_per_s_per_core > 0

    measured = [(p.dlpack, p.users_per_request, p.concurrency) for p in result.served]
    assert measured == [(True, *point) for point in options.points] + [
        (False, *point) for point in options.no_dlpack_points
    ]
    for point in result.served:
        assert point.calls > 0 and point.failed == 0, point.errors
        assert set(NEURAL) <= set(point.stages), "a neural stage did not run"

    # The two servers really were the gpu variant with and without the hand-over.
    on, off = result.served_parameters["dlpack=True"], result.served_parameters["dlpack=False"]
    for name in NEURAL:
        assert on[name]["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no" and on[name]["dlpack"] == "true"
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in off[name] and off[name]["dlpack"] == "false"
        assert on[name]["runtime"] == "torch" and on[name]["device"] == "cpu"
    assert context.served["llm_encoder"].max_batch_size == 1024

    saved = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert saved["dry_run"] and saved["served"] and saved["context"]["git_commit"]
    markdown = (tmp_path / "out" / "gpu.md").read_text()
    assert "NOT a GPU measurement" in markdown and "| on | 1 | 1 |" in markdown
