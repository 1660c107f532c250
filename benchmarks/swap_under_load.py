"""Swap every stage, then roll each back, under a closed-loop load on `recommend`.

Runs its own tritonserver (loopback, free ports, control token) on a temporary copy of a
built repository, keeps N clients sending `recommend` for the whole run (bounded in time
and count), and records requests sent, failed, and latency percentiles before, during and
after the swap sequence. Histories are synthetic (seeded) and labelled so.

    .venv/bin/python benchmarks/swap_under_load.py --clients 16 --settle-seconds 20
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dynemb.bench.context import RunContext, collect_context, context_markdown
from dynemb.loadgen import LoadGenerator, latency_summary
from dynemb.paths import MODEL_REPOSITORY
from dynemb.repository import BuildOptions, build_repository
from dynemb.server import ServerConfig, TritonServer, free_port
from dynemb.swap.candidates import make_candidate
from dynemb.swap.drift import probe_inputs
from dynemb.swap.swapper import Swapper
from dynemb_client import Event

FIVE = ("text_rnn", "image_cnn", "label_mlp", "temporal_lstm", "llm_encoder")
RESULTS = Path(__file__).parent / "results"


def histories() -> list[list[Event]]:
    """Synthetic load histories: the swap probes' users, as client events."""
    x = probe_inputs(n_users=8, seed=99)
    out = []
    for i in range(x["EVENT_TEXT"].shape[0]):
        n = int(x["EVENT_COUNT"][i, 0])
        out.append(
            [
                Event(
                    float(x["EVENT_TIME"][i, j]),
                    x["EVENT_TEXT"][i, j].decode(),
                    x["EVENT_IMAGE"][i, j] or None,
                    [v.decode() for v in x["EVENT_LABELS"][i, j] if v],
                )
                for j in range(n)
            ]
        )
    return out


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dynemb-swap-bench-"))
    repository = work / "model_repository"
    if args.repository:
        shutil.copytree(args.repository, repository)
    else:
        build_repository(BuildOptions(repository=repository, catalogue=args.catalogue))
    token = secrets.token_urlsafe(16)
    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        control_token=token,
        log_file=work / "tritonserver.log",
    )
    swaps = []
    try:
        with TritonServer(config):
            swapper = Swapper(repository, config.grpc_url, token=token)
            load = LoadGenerator(
                config.grpc_url, histories(), clients=args.clients, max_seconds=args.max_seconds
            )
            with load:
                time.sleep(args.warmup_seconds)
                swap_start = time.monotonic() + args.settle_seconds
                time.sleep(args.settle_seconds)
                for stage in FIVE:
                    candidate = make_candidate(
                        repository, stage, work / f"cand-{stage}", scale=args.scale
                    )
                    for action in ("swap", "rollback"):
                        t0 = time.monotonic()
                        result = (
                            swapper.swap(stage, candidate)
                            if action == "swap"
                            else swapper.rollback(stage)
                        )
                        swaps.append(
                            {
                                "stage": stage,
                                "action": action,
                                "old": result.old_version,
                                "new": result.new_version,
                                "seconds": round(time.monotonic() - t0, 2),
                                "drift": result.drift.as_dict() if result.drift else None,
                            }
                        )
                swap_end = time.monotonic()
                time.sleep(args.settle_seconds)
            calls = load.snapshot()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm = (
        [c for c in calls if c.started >= calls[0].started + args.warmup_seconds] if calls else []
    )
    phases = {
        "before": [c for c in warm if c.finished < swap_start],
        "during": [c for c in warm if swap_start <= c.finished <= swap_end],
        "after": [c for c in warm if c.started > swap_end],
    }
    return {
        "phases": {name: latency_summary(group) for name, group in phases.items()},
        "total": latency_summary(calls),
        "load_seconds": round(calls[-1].finished - calls[0].started, 1) if calls else 0,
        "swap_seconds": round(swap_end - swap_start, 1),
        "swaps": swaps,
        "errors": sorted({c.error for c in calls if c.error})[:5],
    }


def markdown(result: dict, ctx: RunContext, clients: int) -> str:
    rows = [
        "| phase | requests | failed | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in [*result["phases"].items(), ("total", result["total"])]:
        rows.append(
            f"| {name} | {s['requests']} | {s['failed']} | {s.get('p50_ms', 0):.1f} | "
            f"{s.get('p90_ms', 0):.1f} | {s.get('p99_ms', 0):.1f} | {s.get('max_ms', 0):.1f} |"
        )
    swaps = ["| stage | action | version | seconds | E_t cosine |", "|---|---|---|---|---|"]
    for s in result["swaps"]:
        cos = s["drift"]["embedding_cosine_mean"] if s["drift"] else float("nan")
        swaps.append(
            f"| {s['stage']} | {s['action']} | v{s['old']} → v{s['new']} | "
            f"{s['seconds']} | {cos:.4f} |"
        )
    return "\n".join(
        [
            "# Hot swap under load",
            "",
            f"Load: {clients} closed-loop clients on `recommend` (k=10) for "
            f"{result['load_seconds']} s, synthetic histories (seeded). The five stages were "
            f"each swapped to a perturbed candidate and rolled back: {len(result['swaps'])} "
            f"swaps in {result['swap_seconds']} s.",
            "",
            *rows,
            "",
            *swaps,
            "",
            f"Failed requests: {result['total']['failed']} of {result['total']['requests']}.",
            "",
            "## Context",
            "",
            context_markdown(ctx),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup-seconds", type=float, default=5)
    parser.add_argument("--settle-seconds", type=float, default=20)
    parser.add_argument("--max-seconds", type=float, default=900, help="hard bound on the load")
    parser.add_argument("--scale", type=float, default=0.02, help="candidate perturbation")
    parser.add_argument("--catalogue", default="synthetic")
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help=f"a built repository to copy (e.g. {MODEL_REPOSITORY})",
    )
    parser.add_argument("--out", default="swap-under-load")
    args = parser.parse_args()
    ctx = collect_context()
    if ctx.load_warning():
        print(f"warning: {ctx.load_warning()}", file=sys.stderr)
    result = run(args)
    ctx.finish()
    text = markdown(result, ctx, args.clients)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text, encoding="utf-8")
    data = {
        "context": ctx.as_dict(),
        "args": vars(args) | {"repository": str(args.repository)},
        **result,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(text)
    if result["total"]["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
