"""Arguments that cannot be carried out are refused as usage errors (status 2) before any
work starts: a zero thread count raised from torch, a zero concurrency divided by zero
in the serving benchmark."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dynemb.cli import app
from dynemb.errors import UsageError


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["train", "--threads", "0"], "--threads"),
        (["train", "--max-epochs", "0"], "--max-epochs"),
        (["train", "--checkpoint", "model.pt"], "that --only STAGE fine-tunes"),  # was ignored
        (["bench", "--quick", "--concurrency", "0,2"], "concurrency must be at least 1, got 0"),
        (["bench-sessions", "--quick", "--past", "0"], "--past"),
        (["bench-sessions", "--quick", "--hold", "0"], "hold must be 1..49, got 0"),
        (["evaluate", "--seeds", "-1"], "seeds must be at least 0, got -1"),
        (["evaluate", "--seeds", "a,b"], "seeds must be integers like 0,1,2"),
        (["evaluate-sessions", "--blocks", "0"], "blocks must be at least 1, got 0"),
    ],
)
def test_arguments_that_cannot_be_carried_out_are_usage_errors(args, said, tmp_path):
    # Were an argument let through, the command would fail fast on a missing data file
    # instead of training, and a benchmark's results would go to tmp_path.
    if args[0].startswith("bench"):
        rest = ["--out-dir", str(tmp_path)]
    else:
        rest = ["--data", str(tmp_path / "missing.jsonl")]
    result = CliRunner().invoke(app, [*args, *rest], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["bench", "--quick", "--data", "ml-100k,bogus"], "unknown benchmark data 'bogus'"),
        # each ended in an IndexError after the server had started
        (["bench", "--quick", "--data", ","], "no benchmark data named"),
        (["bench", "--quick", "--data", ""], "no benchmark data named"),
        (["bench", "--quick", "--seconds", "-1"], "seconds must be a positive number"),
        (["bench", "--quick", "--seconds", "nan"], "seconds must be a positive number"),
        (["bench", "--quick", "--soak-minutes", "-5"], "soak minutes must be >= 0"),
        # wrote its results outside --out-dir
        (["bench", "--quick", "--stem", "../x"], "stem must be a file name"),
        (["bench-gpu", "--device", "cuda"], "no CUDA device here"),
        (["bench-gpu", "--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
    ],
)
def test_a_benchmark_that_cannot_run_says_so_before_it_starts(args, said, tmp_path):
    """Each was a traceback: `--data ml-100k,bogus` after the whole ml-100k benchmark,
    `bench-gpu` without CUDA after making its results folder."""
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    flag = "--out" if args[0] == "bench-gpu" else "--out-dir"
    result = CliRunner().invoke(app, [*args, flag, str(out)], env={"COLUMNS": "200"})
    assert isinstance(result.exception, UsageError) and said in str(result.exception)
    assert not out.exists()
