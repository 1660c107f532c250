"""What reporting stage versions costs: the same code serving a built repository with the
committed configs (every answer carries each stage's version) and a copy with the version
outputs stripped from every config (the adapters then add none), both up at once, driven
in alternating windows by the same closed loop on `user_interest` (MovieLens-100k users'
newest 50 events, one user per request), so that the machine's drift hits both alike.

    .venv/bin/python benchmarks/version_outputs_cost.py --clients 16 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb.bench.closedloop import closed_loop
from dynemb.bench.context import RunContext, collect_context, context_markdown, write_results
from dynemb.bench.histories import movielens
from dynemb.bench.served import one_user_calls, triton, warm
from dynemb.paths import MODEL_REPOSITORY, cache_dir
from dynemb_client import AsyncInterestClient

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("with versions", "without")


@dataclass
class Window:
    variant: str
    round: int
    users_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    failed: int


@dataclass
class CostResult:
    clients: int
    seconds: float
    histories: str
    windows: list[Window] = field(default_factory=list)

    def median(self, variant: str) -> float:
        return statistics.median(w.users_per_s for w in self.windows if w.variant == variant)

    @property
    def ratio(self) -> float:
        return self.median(VARIANTS[0]) / self.median(VARIANTS[1])


def strip_versions(repository: Path) -> None:
    """Every config of `repository` without its <STAGE>_VERSION outputs."""
    for path in repository.glob("*/config.pbtxt"):
        header, body = path.read_text().split("\n", 1)
        config = text_format.Parse(body, mc.ModelConfig())
        kept = [o for o in config.output if not o.name.endswith("_VERSION")]
        del config.output[:]
        config.output.extend(kept)
        for step in config.ensemble_scheduling.step:
            for key in [k for k in step.output_map if k.endswith("_VERSION")]:
                del step.output_map[key]
        path.write_text(f"{header}\n{text_format.MessageToString(config)}")


async def alternate(urls: dict[str, str], histories, args) -> list[Window]:
    clients = {v: AsyncInterestClient(url, retries=0, timeout_s=60) for v, url in urls.items()}
    calls = {}
    for variant, client in clients.items():
        one, prepared = await one_user_calls(client, histories)
        await warm(one, len(prepared))  # every item in each server's caches
        calls[variant] = one
    windows = []
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            load = await closed_loop(calls[variant], args.clients, args.seconds, warmup_s=2.0)
            windows.append(
                Window(
                    variant,
                    r,
                    load.users_per_s,
                    load.percentile(50),
                    load.percentile(99),
                    load.failed,
                )
            )
            print(f"round {r} {variant}: {load.users_per_s:.1f} users/s", flush=True)
    for client in clients.values():
        await client.close()
    return windows


def markdown(result: CostResult, ctx: RunContext) -> str:
    lines = [
        "# The cost of reporting stage versions",
        "",
        f"Two tritonservers on one built repository's copies, one serving the committed "
        f"configs (each answer carries every stage's version), one with the version outputs "
        f"stripped; {result.clients} closed-loop clients on `user_interest`, "
        f"{result.seconds:.0f} s windows alternating between them. {result.histories}.",
        "",
        "| round | variant | users/s | p50 ms | p99 ms | failed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for w in result.windows:
        lines.append(
            f"| {w.round} | {w.variant} | {w.users_per_s:.1f} | {w.p50_ms or 0:.1f} | "
            f"{w.p99_ms or 0:.1f} | {w.failed} |"
        )
    lines += [
        "",
        f"Median users/s: with versions {result.median(VARIANTS[0]):.1f}, without "
        f"{result.median(VARIANTS[1]):.1f}; ratio **{result.ratio:.3f}**.",
        "",
        context_markdown(ctx),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--out", default="version-outputs")
    args = parser.parse_args()
    histories = movielens(args.repository, cache_dir(), max_users=args.users)
    ctx = collect_context(data=histories.description)
    if ctx.load_warning():
        print(f"warning: {ctx.load_warning()}", file=sys.stderr)
    result = CostResult(args.clients, args.seconds, histories.description)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = {}
        for variant in VARIANTS:
            copy = Path(tmp) / variant.replace(" ", "-")
            shutil.copytree(
                args.repository, copy, ignore=shutil.ignore_patterns("__pycache__", "*.incoming")
            )
            if variant != VARIANTS[0]:
                strip_versions(copy)
            logs = Path(tmp) / f"{copy.name}-logs"
            logs.mkdir()
            server = stack.enter_context(triton(copy, logs))
            urls[variant] = server.config.grpc_url
        result.windows = asyncio.run(alternate(urls, histories, args))
    ctx.finish()
    text = markdown(result, ctx)
    write_results(RESULTS / args.out, result, ctx, text)
    print(text)
    return 1 if any(w.failed for w in result.windows) else 0


if __name__ == "__main__":
    sys.exit(main())
