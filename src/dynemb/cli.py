"""The `dynemb` command line: parses flags, calls library functions, shows progress."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynemb.paths import MODEL_REPOSITORY, cache_dir

app = typer.Typer(help="Dynamic user-interest embeddings served by Triton.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger("dynemb")

Repository = Annotated[Path, typer.Option("--repository", help="Triton model repository")]
Url = Annotated[str, typer.Option("--url", help="gRPC endpoint host:port")]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def configs(repository: Repository = MODEL_REPOSITORY) -> None:
    """Regenerate every config.pbtxt from the typed stage specs."""
    from dynemb.pbtxt import write_configs

    for path in write_configs(repository):
        console.print(f"wrote {path}")


@app.command()
def build(
    repository: Repository = MODEL_REPOSITORY,
    catalogue: Annotated[str, typer.Option(help="ml-100k, synthetic, or a JSONL path")] = "ml-100k",
    checkpoint: Annotated[Path | None, typer.Option(help="trained checkpoint")] = None,
    seed: int = 0,
) -> None:
    """Write every stage's version directory (artifact + manifest) and the item table."""
    from dynemb.repository import BuildOptions, build_repository

    options = BuildOptions(repository, catalogue, checkpoint, seed)
    with _progress() as progress:
        task = progress.add_task("exporting stages", total=7)

        def track(stages: list[str]):
            for stage in stages:
                progress.update(task, description=f"exporting {stage}")
                yield stage
                progress.advance(task)

        manifests = build_repository(options, progress=track)
    trained = all(m.trained for m in manifests.values() if m.stage != "preprocess")
    console.print(f"built {repository} ({'trained' if trained else 'UNTRAINED'} weights)")


@app.command()
def serve(
    repository: Repository = MODEL_REPOSITORY,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    log_file: Annotated[Path | None, typer.Option(help="server log")] = None,
    insecure_control: Annotated[
        bool, typer.Option(help="leave load/unload unprotected (loopback only)")
    ] = False,
) -> None:
    """Start tritonserver on the repository; stop cleanly on Ctrl-C or SIGTERM.

    Model control (load, unload, repository index) needs the token from
    DYNEMB_CONTROL_TOKEN or the 0600 token file created on first serve; inference is open.
    """
    from dynemb.control import ControlError, load_token, server_args
    from dynemb.server import ServerConfig, TritonServer

    token = None if insecure_control else load_token(create=True)
    try:
        server_args(token, host)
    except ControlError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    config = ServerConfig(
        repository, host, grpc_port, http_port, metrics_port, log_file, control_token=token
    )
    server = TritonServer(config)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # A process started in the background by a non-interactive shell inherits SIGINT as
    # ignored, and Python then leaves it ignored: Ctrl-C / kill -INT must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.start()
        with _progress() as progress:
            task = progress.add_task("loading models", total=len(config.models))
            server.wait_ready(lambda done, total: progress.update(task, completed=done))
        console.print(f"serving on {config.grpc_url} (gRPC); log: {server.log_file}")
        console.print("Ctrl-C to stop")
        server.process.wait()
        console.print(f"tritonserver exited:\n{server.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        server.stop()


def _histories(events: Path, user: str | None, repository: Path) -> list[tuple[str, list]]:
    from dynemb.data.jsonl import iter_user_events
    from dynemb.demo import event_converter

    convert = event_converter(repository)
    return [(u, [convert(e) for e in evs]) for u, evs in iter_user_events(events, user)]


@app.command()
def embed(
    events: Annotated[Path, typer.Option(help="JSON Lines: user, time, text, image, labels")],
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    at: Annotated[float | None, typer.Option(help="query time t (unix s)")] = None,
    url: Url = "127.0.0.1:8001",
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Print each user's E_t as one JSON line."""
    from dynemb_client import InterestClient

    with InterestClient(url) as client:
        for user_id, history in _histories(events, user, repository):
            vector = client.embed(history, at=at)
            print(json.dumps({"user": user_id, "at": at, "embedding": vector.tolist()}))


@app.command()
def recommend(
    events: Annotated[Path, typer.Option(help="JSON Lines: user, time, text, image, labels")],
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    at: Annotated[float | None, typer.Option(help="query time t (unix s)")] = None,
    k: int = 10,
    url: Url = "127.0.0.1:8001",
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Print each user's top-k items as one JSON line."""
    from dynemb_client import InterestClient

    with InterestClient(url) as client:
        for user_id, history in _histories(events, user, repository):
            items = client.recommend(history, k=k, at=at)
            rows = [{"item_id": i.item_id, "score": i.score, "title": i.title} for i in items]
            print(json.dumps({"user": user_id, "at": at, "items": rows}, ensure_ascii=False))


@app.command()
def demo(
    repository: Repository = MODEL_REPOSITORY,
    catalogue: str = "ml-100k",
    train_minutes: Annotated[
        float, typer.Option(help="demo training budget when no checkpoint exists")
    ] = 3.0,
    rebuild: Annotated[bool, typer.Option(help="rebuild even if built")] = False,
) -> None:
    """Train briefly if needed, build, serve on free loopback ports, query sample users, stop."""
    from dynemb.control import load_token
    from dynemb.demo import (
        demo_checkpoint,
        needs_build,
        query,
        render,
        sample_histories,
        training_status,
    )
    from dynemb.server import ServerConfig, TritonServer, free_port

    checkpoint, fresh = demo_checkpoint(catalogue, train_minutes, console.print)
    if rebuild or fresh or needs_build(repository, checkpoint):
        build(repository, catalogue, checkpoint, 0)
    config = ServerConfig(
        repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        control_token=load_token(create=True),
    )
    histories = sample_histories(catalogue, cache_dir(), repository)
    server = TritonServer(config)
    try:
        server.start()
        with _progress() as progress:
            task = progress.add_task("starting tritonserver", total=len(config.models))
            server.wait_ready(lambda done, total: progress.update(task, completed=done))
        results = query(config.grpc_url, histories)
    finally:
        server.stop()
    render(results, training_status(repository), print)


@app.command()
def train(
    data: Annotated[
        str, typer.Option("--data", "--dataset", help="ml-100k, synthetic, or a JSONL path")
    ] = "ml-100k",
    out: Annotated[
        Path | None, typer.Option(help="checkpoint (or, with --only, version dir)")
    ] = None,
    seed: int = 0,
    max_minutes: Annotated[float, typer.Option(help="training budget (wall clock)")] = 25.0,
    only: Annotated[str | None, typer.Option(help="fine-tune only this stage")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="with --only: the model to start from")
    ] = None,
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Train all stages jointly (next-item prediction, full softmax over items), or with
    --only STAGE fine-tune one stage of a checkpoint into a swappable version directory."""
    from dynemb.data import load_dataset
    from dynemb.training.train import TrainOptions
    from dynemb.training.train import train as train_model

    dataset = load_dataset(data, cache_dir())
    options = TrainOptions(seed=seed, max_minutes=max_minutes)
    default_checkpoint = cache_dir() / "checkpoints" / f"{dataset.name}.pt"
    if only is None:
        path = out or default_checkpoint
        train_model(dataset, options).save(path)
        console.print(f"wrote {path}; export it with `dynemb build --checkpoint {path}`")
        return
    from dynemb.training.stage import fine_tune_stage

    target = out or cache_dir() / "candidates" / f"{only}-seed{seed}"
    manifest = fine_tune_stage(
        dataset, checkpoint or default_checkpoint, only, target, options, repository
    )
    console.print(f"wrote {target}; swap it with `dynemb swap {only} {target}`")
    print(json.dumps(manifest.provenance, indent=1, default=str))


_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_FORWARD)
def evaluate(ctx: typer.Context) -> None:
    """The quality benchmark (dynemb vs MostPop vs SASRec-CE, ablations, cold start);
    options as `python -m dynemb.training.evaluate --help`."""
    from dynemb.training.evaluate import main as evaluate_main

    evaluate_main(ctx.args)


@app.command(context_settings=_FORWARD)
def dynamics(ctx: typer.Context) -> None:
    """E_t after interest changes on synthetic data; options as
    `python -m dynemb.training.dynamics --help`."""
    from dynemb.training.dynamics import main as dynamics_main

    dynamics_main(ctx.args)


def _swapper(repository: Path, url: str):
    from dynemb.control import load_token
    from dynemb.swap.swapper import Swapper

    return Swapper(repository, url, token=load_token(create=False))


@app.command()
def swap(
    stage: Annotated[str, typer.Argument(help="stage to replace, e.g. text_rnn")],
    artifact: Annotated[Path, typer.Argument(help="version directory: artifact + manifest")],
    accept_drift: Annotated[bool, typer.Option(help="swap even if drift is out of bounds")] = False,
    repository: Repository = MODEL_REPOSITORY,
    url: Url = "127.0.0.1:8001",
) -> None:
    """Check, probe drift, install as the next version, load, verify; restore on failure."""
    from dynemb.swap.swapper import SwapFailedError, SwapRefusedError

    swapper = _swapper(repository, url)
    try:
        result = swapper.swap(stage, artifact, accept_drift=accept_drift, progress=console.print)
    except (SwapRefusedError, SwapFailedError) as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]")
        raise typer.Exit(1) from exc
    print(
        json.dumps(
            {
                "stage": stage,
                "old": result.old_version,
                "new": result.new_version,
                "drift": result.drift.as_dict() if result.drift else None,
                "seconds": round(result.seconds, 2),
            }
        )
    )


@app.command()
def rollback(
    stage: str,
    to: Annotated[int | None, typer.Option(help="version to serve again (default: parent)")] = None,
    repository: Repository = MODEL_REPOSITORY,
    url: Url = "127.0.0.1:8001",
) -> None:
    """Serve an earlier version of STAGE again (installed as a new, newest version)."""
    from dynemb.swap.swapper import SwapFailedError, SwapRefusedError

    try:
        result = _swapper(repository, url).rollback(stage, to, progress=console.print)
    except (SwapRefusedError, SwapFailedError) as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]")
        raise typer.Exit(1) from exc
    print(json.dumps({"stage": stage, "old": result.old_version, "new": result.new_version}))


@app.command()
def versions(repository: Repository = MODEL_REPOSITORY) -> None:
    """Each stage's versions with manifest summaries; * marks the one serving."""
    from dynemb.swap.swapper import list_versions

    for row in list_versions(repository):
        mark = "*" if row.serving else " "
        state = "trained" if row.trained else "untrained"
        print(f"{mark} {row.stage:<14} v{row.version:<3} {state:<9} {row.created}  {row.summary}")


@app.command()
def candidate(
    stage: str,
    out: Path,
    kind: Annotated[
        str, typer.Option(help="perturb | reinit | nan | broken | signature")
    ] = "perturb",
    scale: float = 0.01,
    seed: int = 0,
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Write a candidate version of STAGE to OUT from the serving one (for trials and drills)."""
    from dynemb.swap.candidates import make_candidate

    console.print(f"wrote {make_candidate(repository, stage, out, kind, scale, seed)}")


if __name__ == "__main__":
    sys.exit(app())
