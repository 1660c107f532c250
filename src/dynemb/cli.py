"""The `dynemb` command line: parses flags, calls library functions, shows progress.

A mistake of the user's (a bad events file, a missing checkpoint, a server that is not
up, a refused swap) prints one line and exits with status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynemb.errors import DynembError
from dynemb.extras import extra_of, require
from dynemb.paths import MODEL_REPOSITORY, RESULTS_DIR, cache_dir

if TYPE_CHECKING:  # typing only: commands import the evaluation code they use
    from dynemb.evaluation.results import RunRecord

app = typer.Typer(
    help="Dynamic user-interest embeddings served by Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("dynemb")

Repository = Annotated[Path, typer.Option("--repository", help="Triton model repository")]
QueryTime = Annotated[
    str | None,
    typer.Option(help="query time t: unix seconds or ISO-8601 (default: each user's newest event)"),
]
Url = Annotated[str, typer.Option("--url", help="gRPC endpoint host:port")]
Data = Annotated[
    str, typer.Option("--data", "--dataset", help="ml-100k, synthetic, or a JSONL path")
]
Seeds = Annotated[str, typer.Option(help="comma-separated seeds, fixed before running")]
Threads = Annotated[int, typer.Option(min=1, help="torch intra-op threads")]
Resume = Annotated[
    bool, typer.Option(help="take the runs an interrupted invocation finished (same code, data)")
]


def main() -> None:
    """Entry point of the `dynemb` script: user errors as one line, not a traceback."""
    from dynemb_client import ClientInputError
    from dynemb_client import ServerError as ClientServerError

    stop_like_ctrl_c()
    try:
        try:
            app()
        finally:  # what a command printed is written now, where a failure can be said
            sys.stdout.flush()
    except (DynembError, ClientInputError, ClientServerError) as exc:
        print(f"dynemb: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except ModuleNotFoundError as exc:  # an optional extra a command imports late
        extra = extra_of(exc.name)
        if extra is None:
            raise
        print(f"dynemb: error: needs {exc.name}: pip install 'dynemb[{extra}]'", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader went away (`| head`): quietly, as a pipe does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:  # a full disk, a path through a file, no permission
        if exc.errno is None:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dynemb: error: {exc.strerror}{where}", file=sys.stderr)
        sys.exit(1)


def stop_like_ctrl_c() -> None:
    """SIGTERM and SIGINT both unwind like Ctrl-C, so every command stops the servers,
    replicas and workers it started (their context managers run): a benchmark killed with
    SIGTERM left its tritonserver and stage processes running. A process started in the
    background by a non-interactive shell inherits SIGINT as ignored, and Python then
    leaves it ignored: kill -INT must still stop it."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _say_resumed(run: RunRecord) -> None:
    if run.resumed_runs:
        console.print(f"{run.resumed_runs} runs resumed from an interrupted invocation")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _evaluation_training(max_minutes: float, max_epochs: int, threads: int, workers: int = 1):
    """The training options of each seed an evaluation trains (a progress bar on a tty,
    when runs do not share it)."""
    from dynemb.training.train import TrainOptions

    return TrainOptions(
        max_minutes=max_minutes,
        max_epochs=max_epochs,
        num_threads=threads,
        progress=sys.stderr.isatty() and workers == 1,
    )


def _seeds(text: str) -> tuple[int, ...]:
    return _integers(text, "seeds", least=0)


def _integers(text: str, what: str, least: int) -> tuple[int, ...]:
    """A comma-separated list of integers, each at least `least` ("0,1,2")."""
    try:
        values = tuple(int(part) for part in text.replace(" ", ",").split(",") if part)
    except ValueError:
        example = ",".join(str(least + i) for i in range(3))
        raise typer.BadParameter(f"{what} must be integers like {example}, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{what}: at least one")
    if min(values) < least:
        raise typer.BadParameter(f"{what} must be at least {least}, got {min(values)}")
    return values


def _command() -> str:
    return "dynemb " + " ".join(sys.argv[1:])


@app.callback()
def options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log progress (INFO) to stderr")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


TargetName = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="cpu (model_repository/), gpu or triton-container (build/variants/<target>/)",
    ),
]


@app.command()
def configs(
    repository: Annotated[
        Path | None, typer.Option("--repository", help="write a complete skeleton here")
    ] = None,
    target: TargetName = None,
) -> None:
    """Regenerate config.pbtxt and model.py files from the stage registry's specs: with no
    option, every target's committed ones in this checkout (model_repository/ and
    build/variants/*/); with --repository, one target's complete repository skeleton."""
    from dynemb import targets
    from dynemb.configs import write_configs, write_variant

    chosen = [targets.get(target)] if target else list(targets.TARGETS.values())
    for found in chosen:
        if repository is not None:
            written = write_configs(repository, target=found)
        elif found is targets.CPU:
            written = write_configs(MODEL_REPOSITORY)
        else:
            written = write_variant(Path(found.directory), found)
        for path in written:
            console.print(f"wrote {path}")
        if repository is not None:
            break


@app.command()
def k8s(
    out: Annotated[Path, typer.Option(help="where the manifests go")] = Path("deploy/k8s"),
    image: Annotated[str, typer.Option(help="the image deploy/Dockerfile built")] = (
        "dynemb-triton:0.1.0"
    ),
    namespace: str = "dynemb",
    replicas: Annotated[int, typer.Option(min=1)] = 3,
    max_replicas: Annotated[int, typer.Option(min=1, help="the autoscaler's ceiling")] = 12,
) -> None:
    """Write the Kubernetes manifests (Deployment, headless Service, PDB, HPA, adapter rule)."""
    from dynemb.k8s import K8sOptions, write_manifests

    try:
        options = K8sOptions(
            image=image,
            namespace=namespace,
            replicas=replicas,
            min_replicas=min(2, replicas),
            max_replicas=max_replicas,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    for path in write_manifests(out, options):
        console.print(f"wrote {path}")


@app.command()
def build(
    repository: Repository = MODEL_REPOSITORY,
    catalogue: Annotated[str, typer.Option(help="ml-100k, synthetic, or a JSONL path")] = "ml-100k",
    checkpoint: Annotated[Path | None, typer.Option(help="trained checkpoint")] = None,
    seed: int = 0,
    target: Annotated[
        str, typer.Option(help="cpu, gpu or triton-container: whose configs (see GPUs)")
    ] = "cpu",
) -> None:
    """Write every stage's version directory (artifact + manifest) and the item table,
    with the configs of a build target."""
    from dynemb import stages, targets
    from dynemb.repository import BuildOptions, build_repository

    options = BuildOptions(repository, catalogue, checkpoint, seed, target=targets.get(target))
    with _progress() as progress:
        task = progress.add_task("exporting stages", total=len(stages.NAMES))

        def track(names: Iterable[str]) -> Iterator[str]:
            for name in names:
                progress.update(task, description=f"exporting {name}")
                yield name
                progress.advance(task)

        manifests = build_repository(options, progress=track)
    learned = [m for name, m in manifests.items() if stages.get(name).learned]
    trained = all(m.trained for m in learned)
    console.print(
        f"built {repository} for target {target} ({'trained' if trained else 'UNTRAINED'} weights)"
    )


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
    supervise: Annotated[
        bool, typer.Option(help="bring a dead or hung stage process back by itself")
    ] = True,
    supervisor_port: Annotated[
        int, typer.Option(help="the supervisor's Prometheus metrics (0: none)")
    ] = 8003,
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            help="servers on this host, replica i on every port + i * 100 "
            "(client: InterestClient(urls=[...]) balances over them)",
        ),
    ] = 1,
    cuda_memory_pool_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="GPU 0's CUDA memory pool for GPU tensors between stages (the gpu variant; "
            "0: Triton's 64 MiB)",
        ),
    ] = 0,
) -> None:
    """Start tritonserver on the repository; stop cleanly on Ctrl-C or SIGTERM.

    Model control (load, unload, repository index, log and trace settings) needs the token
    from DYNEMB_CONTROL_TOKEN or the 0600 token file created on first serve; inference is
    open. A stage whose process dies or hangs is reloaded by the supervisor (dynemb.supervisor);
    a tritonserver that exits by itself is started again, unless it did 5 times in 10 minutes
    (dynemb.cluster.RestartBudget).
    """
    from dynemb.cluster import PORT_STEP, Replicas, RestartBudget, stepped_configs
    from dynemb.control import load_token, server_args
    from dynemb.server import ServerConfig
    from dynemb.supervisor import StageSupervisor

    token = None if insecure_control else load_token(create=True)
    server_args(token, host)  # refuses an open non-loopback server before anything starts
    base = ServerConfig(
        repository,
        host,
        grpc_port,
        http_port,
        metrics_port,
        log_file,
        control_token=token,
        cuda_memory_pool_mb=cuda_memory_pool_mb,
    )
    try:
        cluster = Replicas(stepped_configs(base, replicas))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    supervisors: dict[int, StageSupervisor] = {}
    budgets = [RestartBudget() for _ in range(replicas)]

    def supervise_replica(i: int) -> None:
        if supervise:
            port = supervisor_port + i * PORT_STEP if supervisor_port else None
            supervisors[i] = StageSupervisor(cluster.servers[i], token, metrics_port=port).start()

    try:
        with _progress() as progress:
            task = progress.add_task("loading models", total=replicas * len(base.models))
            cluster.start(lambda done, total: progress.update(task, completed=done))
        for i, server in enumerate(cluster.servers):
            supervise_replica(i)
            console.print(f"serving on {server.config.grpc_url} (gRPC); log: {server.log_file}")
        console.print("Ctrl-C to stop")
        while True:
            time.sleep(0.5)
            for i, running in enumerate(cluster.running()):
                if running:
                    continue
                dead = cluster.servers[i]
                url = dead.config.grpc_url
                console.print(
                    f"tritonserver {url} exited ({dead.how_it_exited()}):\n{dead.log_tail()}"
                )
                if not budgets[i].allows(time.monotonic()):
                    window = budgets[i].window_s / 60
                    console.print(
                        f"tritonserver {url} exited {budgets[i].limit} times in "
                        f"{window:.0f} minutes; not starting it again"
                    )
                    raise typer.Exit(1)
                # As a Deployment would: clients retry (the others serve meanwhile).
                if i in supervisors:
                    supervisors.pop(i).stop()
                console.print(f"starting {url} again")
                cluster.restart(i)
                supervise_replica(i)
                console.print(f"serving on {url} again")
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        # Servers first (each is bounded: SIGTERM, then SIGKILL after its exit timeout),
        # with Ctrl-C and SIGTERM ignored meanwhile: a second one must not leave a
        # tritonserver running in its own session. The supervisors, told to stop first,
        # then end promptly.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for supervisor in supervisors.values():
                supervisor.stop_soon()
            cluster.stop()
            for supervisor in supervisors.values():
                supervisor.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@app.command()
def embed(
    events: Annotated[Path, typer.Option(help="JSON Lines: user, time, text, image, labels")],
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    at: QueryTime = None,
    url: Url = "127.0.0.1:8001",
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Print each user's E_t as one JSON line."""
    from dynemb.queries import embed_events

    for row in embed_events(events, user, at, url, repository):
        print(json.dumps({"user": row.user, "at": row.at, "embedding": row.embedding.tolist()}))


@app.command()
def recommend(
    events: Annotated[Path, typer.Option(help="JSON Lines: user, time, text, image, labels")],
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    at: QueryTime = None,
    k: Annotated[int, typer.Option(help="items per user (1..100)")] = 10,
    include_seen: Annotated[
        bool, typer.Option(help="also recommend the items of the history sent")
    ] = False,
    url: Url = "127.0.0.1:8001",
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Print each user's top-k items as one JSON line, leaving out the items of the history
    sent (the model ranks the items a user has not had) unless --include-seen."""
    from dynemb.queries import recommend_events

    for row in recommend_events(events, user, at, k, not include_seen, url, repository):
        items = [{"item_id": i.item_id, "score": i.score, "title": i.title} for i in row.items]
        print(json.dumps({"user": row.user, "at": row.at, "items": items}, ensure_ascii=False))


@app.command(name="embed-all")
def embed_all(
    events: Annotated[
        Path, typer.Option(help="events file or directory of them (JSON Lines or Parquet)")
    ],
    out: Annotated[Path, typer.Option(help="output directory of Parquet files")],
    k: Annotated[int, typer.Option(min=1, max=100, help="items per user")] = 10,
    workers: Annotated[int, typer.Option(min=1, help="embedder actors, one CPU each")] = (
        os.cpu_count() or 1
    ),
    address: Annotated[
        str | None, typer.Option(help="a Ray cluster (ray://host:10001 or auto); default: local")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Every user's E_t and top-k items as a Ray Data job (Parquet: user, at, embedding,
    items, scores); each user's events in one file."""
    require("ray", "embed-all")
    from dynemb.bulk import EmbedAllOptions
    from dynemb.bulk import embed_all as run

    result = run(
        EmbedAllOptions(
            events, out, repository, k=k, workers=workers, address=address, overwrite=overwrite
        ),
        say=console.print,
    )
    console.print(
        f"{result.users} users from {result.files} file(s) in {result.seconds:.1f} s "
        f"({result.users_per_s:.1f} users/s) -> {result.out}"
    )


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
    data: Data = "ml-100k",
    out: Annotated[
        Path | None, typer.Option(help="checkpoint (or, with --only, version dir)")
    ] = None,
    seed: int = 0,
    max_minutes: Annotated[float, typer.Option(help="training budget (wall clock)")] = 25.0,
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="epochs (the cosine schedule)")
    ] = None,
    threads: Threads = 2,
    only: Annotated[str | None, typer.Option(help="fine-tune only this stage")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="with --only: the model to start from")
    ] = None,
    repository: Repository = MODEL_REPOSITORY,
) -> None:
    """Train all stages jointly (next-item prediction, full softmax over items), or with
    --only STAGE fine-tune one stage of a checkpoint into a swappable version directory."""
    from dataclasses import replace

    from dynemb.checkpoint import check_checkpoint_path
    from dynemb.data import load_dataset
    from dynemb.training.train import TrainOptions
    from dynemb.training.train import train as train_model

    if only is None and checkpoint is not None:
        raise typer.BadParameter(
            "is the model that --only STAGE fine-tunes; a joint run starts anew",
            param_hint="--checkpoint",
        )
    if only is None and out is not None:
        check_checkpoint_path(out)  # before training, not after it
    dataset = load_dataset(data, cache_dir())
    options = TrainOptions(seed=seed, max_minutes=max_minutes, num_threads=threads)
    if max_epochs is not None:
        options = replace(options, max_epochs=max_epochs)
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
    print(json.dumps(manifest.provenance.to_json(), indent=1, default=str))


@app.command()
def evaluate(
    data: Data = "ml-100k",
    seeds: Seeds = "0,1,2,3,4",
    max_minutes: Annotated[float, typer.Option(help="training budget per seed")] = 25.0,
    max_epochs: Annotated[int, typer.Option(min=1, help="epochs per seed (cosine schedule)")] = 16,
    threads: Threads = 2,
    workers: Annotated[
        int, typer.Option(min=1, help="training runs side by side, one process each")
    ] = 1,
    ablations: Annotated[bool, typer.Option(help="train the ablation variants (seed 1st)")] = True,
    ablation_minutes: Annotated[float | None, typer.Option(help="budget per ablation")] = None,
    ablation_epochs: Annotated[int | None, typer.Option(help="epochs per ablation")] = None,
    cold_items: Annotated[
        bool, typer.Option(help="the cold-item slice: 10% of items withheld from training")
    ] = True,
    cold_item_seeds: Annotated[
        str | None, typer.Option(help="seeds of the cold-item runs (default: the first)")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="MostPop and the tuned SASRec-CE")] = True,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    stem: Annotated[str, typer.Option(help="results file name, without extension")] = (
        "quality-ml100k"
    ),
    checkpoint: Annotated[Path | None, typer.Option(help="save the first seed's model")] = None,
    resume: Resume = True,
) -> None:
    """The quality benchmark: dynemb vs MostPop vs SASRec-CE on the leave-one-out protocol
    (full ranking), the ratio's bootstrap interval, ablations, cold-start slices and the
    cold-item slice; writes STEM.md and STEM.json. With --workers 2 and --threads 1, two
    runs train at once on a 2-core machine. Each finished run is kept under
    .cache/dynemb/runs until the report is written, so that the same command after Ctrl-C
    trains only what had not finished."""
    from dynemb.data import load_dataset
    from dynemb.evaluation.quality import QualityOptions, quality_benchmark

    options = QualityOptions(
        data=data,
        seeds=_seeds(seeds),
        train=_evaluation_training(max_minutes, max_epochs, threads, workers),
        ablation_minutes=ablation_minutes,
        ablation_epochs=ablation_epochs,
        ablations=ablations,
        baselines=baselines,
        cold_items=cold_items,
        cold_item_seeds=_seeds(cold_item_seeds) if cold_item_seeds else None,
        workers=workers,
        out_dir=out_dir,
        stem=stem,
        checkpoint=checkpoint,
        command=_command(),
        resume=resume,
    )
    result = quality_benchmark(load_dataset(data, cache_dir()), options)
    _say_resumed(result.run)
    for name, model in result.models.items():
        mean, std = model.summary()["ndcg@10"]
        console.print(f"{name}: NDCG@10 {mean:.4f} ± {std:.4f} (seen excluded)")
    if result.ratio_interval is not None:
        low, high = result.ratio_interval
        console.print(f"dynemb / SASRec-CE: {result.ratio('ndcg@10'):.3f}x ({low:.3f}-{high:.3f})")
    console.print(f"wrote {out_dir / stem}.md and .json")


@app.command("evaluate-sessions")
def evaluate_sessions(
    data: Data = "ml-100k",
    seeds: Seeds = "0,1,2",
    blocks: Annotated[str, typer.Option(help="re-window blocks B to compare with B = 1")] = (
        "10,25,50"
    ),
    max_minutes: Annotated[float, typer.Option(help="training budget per seed")] = 25.0,
    max_epochs: Annotated[int, typer.Option(min=1, help="epochs per seed (cosine schedule)")] = 16,
    threads: Threads = 2,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    stem: Annotated[str, typer.Option(help="results file name, without extension")] = (
        "sessions-quality-ml100k"
    ),
    resume: Resume = True,
) -> None:
    """Sessions past the window: NDCG@10 of E_t over the window a session holds (each
    re-window block B) next to the full model's newest L events, on the same trained
    models and the leave-one-out protocol; writes STEM.md and STEM.json. Finished seeds
    are kept until then (.cache/dynemb/runs): after Ctrl-C the same command resumes."""
    from dynemb.data import load_dataset
    from dynemb.dims import DIMS
    from dynemb.evaluation.streaming import StreamingOptions, streaming_benchmark

    chosen = _integers(blocks, "blocks", least=1)
    if any(not 1 < b <= DIMS.max_events for b in chosen):
        raise typer.BadParameter(f"blocks must be in [2, {DIMS.max_events}], got {blocks!r}")
    options = StreamingOptions(
        seeds=_seeds(seeds),
        blocks=chosen,
        train=_evaluation_training(max_minutes, max_epochs, threads),
        out_dir=out_dir,
        stem=stem,
        command=_command(),
        resume=resume,
    )
    result = streaming_benchmark(load_dataset(data, cache_dir()), options)
    _say_resumed(result.run)
    full_mean, full_std = result.summary(None)
    console.print(f"full model: NDCG@10 {full_mean:.4f} ± {full_std:.4f}")
    for block in result.blocks:
        verdict = {
            True: "within one seed-std of the full model",
            False: "NOT within one seed-std of the full model",
            None: "one seed: no std to compare with",
        }[result.within_one_std(block)]
        mean, std = result.summary(block)
        console.print(f"B = {block}: NDCG@10 {mean:.4f} ± {std:.4f} ({verdict})")
    console.print(f"wrote {out_dir / stem}.md and .json")


@app.command()
def baselines(
    data: Data = "ml-100k",
    seeds: Seeds = "0,1,2",
    tune: Annotated[bool, typer.Option(help="pick SASRec's config on validation first")] = False,
    threads: Threads = 2,
    out: Annotated[Path | None, typer.Option(help="also write the Markdown here")] = None,
) -> None:
    """MostPop and SASRec-CE on the leave-one-out protocol (tuned config, or --tune the
    grid on validation first); prints a Markdown report."""
    from dataclasses import replace

    from dynemb.data import load_dataset
    from dynemb.evaluation.baselines import (
        TUNED_SASREC,
        BaselineOptions,
        baseline_benchmark,
        config_label,
        render_markdown,
    )
    from dynemb.evaluation.split import leave_one_out

    dataset = load_dataset(data, cache_dir())
    options = BaselineOptions(
        seeds=_seeds(seeds), tune=tune, config=replace(TUNED_SASREC, num_threads=threads)
    )
    report = baseline_benchmark(
        leave_one_out(dataset),
        dataset.name,
        options,
        on_tuned=lambda row: console.print(
            f"tuned {config_label(row.config)}: valid NDCG@10 {row.valid_ndcg10:.4f}"
        ),
    )
    text = render_markdown(report)
    if out is not None:
        out.write_text(text, encoding="utf-8")
    print(text, end="")


@app.command()
def dynamics(
    seeds: Seeds = "0,1,2",
    max_minutes: Annotated[float, typer.Option(help="training budget per seed")] = 3.0,
    max_epochs: Annotated[int, typer.Option(min=1, help="epochs per seed (cosine schedule)")] = 16,
    patience: Annotated[
        int | None, typer.Option(help="early stopping (default: run every epoch)")
    ] = None,
    threads: Threads = 2,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    resume: Resume = True,
) -> None:
    """Does E_t follow a change of interest? Fresh vs stale query time vs a static profile,
    on SYNTHETIC users whose interest changes at known points; writes
    dynamics-synthetic.md/.json/.png."""
    require("bench", "dynamics", ("matplotlib",))  # its plot
    from dynemb.evaluation.dynamics import DynamicsOptions, criterion_met, dynamics_benchmark
    from dynemb.training.train import TrainOptions

    # By default every epoch of the schedule runs and the best one is kept: before the
    # lookup tables had their own learning rate, early stopping once ended a seed still on
    # the initial popularity plateau (benchmarks/results/dynamics-synthetic.md).
    train_options = TrainOptions(
        max_minutes=max_minutes,
        num_threads=threads,
        max_epochs=max_epochs,
        patience=patience or max_epochs,
        windows="all",
        progress=sys.stderr.isatty(),
    )
    options = DynamicsOptions(
        seeds=_seeds(seeds),
        train=train_options,
        out_dir=out_dir,
        command=_command(),
        resume=resume,
    )
    result = dynamics_benchmark(options)
    _say_resumed(result.run)
    verdict = "met" if criterion_met(result) else "NOT met"
    console.print(f"fresh E_t beats the static profile by > 3 std: {verdict} (SYNTHETIC data)")


@app.command()
def bench(
    repository: Repository = MODEL_REPOSITORY,
    quick: Annotated[bool, typer.Option(help="smoke run: 3 concurrencies, 3 s each")] = False,
    seconds: Annotated[float | None, typer.Option(help="measured seconds per point")] = None,
    concurrency: Annotated[
        str | None, typer.Option(help="comma-separated client counts (default 1..64)")
    ] = None,
    data: Annotated[str | None, typer.Option(help="ml-100k,synthetic-images")] = None,
    perf_analyzer: Annotated[bool, typer.Option(help="cross-check with perf_analyzer")] = True,
    soak_minutes: Annotated[float | None, typer.Option(help="memory soak (0: none)")] = None,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    stem: Annotated[str | None, typer.Option(help="results file name")] = None,
) -> None:
    """Serving benchmark: Triton (C) vs the same pipeline in-process (A) vs a plain FastAPI
    server (B), at concurrency 1..64; writes STEM.md/.json/.png with ratios and targets."""
    require("bench", "bench")
    from dataclasses import replace

    from dynemb.bench.serving import ServingOptions, serving_benchmark

    if quick:
        options = ServingOptions.quick_run(repository, out_dir, cache_dir(), _command())
    else:
        options = ServingOptions(repository, out_dir, cache_dir(), command=_command())
    changes: dict[str, object] = {"perf_analyzer": perf_analyzer and options.perf_analyzer}
    if seconds is not None:
        changes["seconds"] = seconds
    if concurrency is not None:
        changes["concurrencies"] = _integers(concurrency, "concurrency", least=1)
    if data is not None:
        changes["data"] = tuple(part for part in data.split(",") if part)
    if soak_minutes is not None:
        changes["soak_minutes"] = soak_minutes
    if stem is not None:
        changes["stem"] = stem
    options = replace(options, **changes)
    result = serving_benchmark(options, console.print)
    for check in result.targets:
        console.print(f"{'met ' if check.met else 'MISSED'}  {check.target}: {check.measured}")
    console.print(f"wrote {out_dir / options.stem}.md, .json, .png")


@app.command(name="bench-gpu")
def bench_gpu(
    out: Annotated[Path, typer.Option(help="results folder (gpu.json, gpu.md, server logs)")],
    device: Annotated[str, typer.Option(help="cuda (cuda:N) or cpu: the dry run")] = "cuda",
    dry_run: Annotated[
        bool, typer.Option(help="tiny sizes and short windows (the CI check, --device cpu)")
    ] = False,
    budget_s: Annotated[
        float | None, typer.Option(help="the whole run's seconds; phases that do not fit skip")
    ] = None,
    seconds: Annotated[float | None, typer.Option(help="measured window per point")] = None,
    repository: Annotated[
        Path | None, typer.Option(help="build here (default: a temporary folder)")
    ] = None,
) -> None:
    """Issue 13's GPU check: build the gpu variant, E_t parity against CPU fp32 at each
    precision, in-process GPU throughput at batch 64/256/1024, served throughput and
    p50/p99 with and without DLPack; a short table last (benchmarks/gpu/README.md)."""
    from dataclasses import replace

    from dynemb.bench.gpu import GpuBenchOptions, run_gpu_bench, summary

    options = (
        GpuBenchOptions.dry_run(out, repository)
        if dry_run
        else GpuBenchOptions(out=out, repository=repository)
    )
    options = replace(options, device=device)
    if budget_s is not None:
        options = replace(options, budget_s=budget_s)
    if seconds is not None:
        options = replace(options, seconds=seconds)
    result, _ = run_gpu_bench(options, say=console.print)
    console.print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'}")
    print(summary(result))


@app.command(name="bench-runtimes")
def bench_runtimes(
    repository: Repository = MODEL_REPOSITORY,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    max_users: Annotated[int, typer.Option(help="MovieLens users to feed")] = 256,
) -> None:
    """Each torch stage under torch eager and ONNX Runtime, one thread, batch 1 and 32:
    ms per user and the largest difference; writes runtimes.md/.json."""
    from dataclasses import asdict

    from dynemb.bench.context import collect_context
    from dynemb.bench.histories import movielens, synthetic_with_images
    from dynemb.bench.runtimes import render_markdown, sweep

    context = collect_context(data="MovieLens-100k users and SYNTHETIC users with images")
    sets = [movielens(repository, cache_dir(), max_users), synthetic_with_images(max_users)]
    result = sweep(repository, sets, context)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = asdict(result)
    payload["context"] = result.context.as_dict()
    (out_dir / "runtimes.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out_dir / "runtimes.md").write_text(render_markdown(result), encoding="utf-8")
    console.print(render_markdown(result).split("## Context")[0])


@app.command(name="bench-faults")
def bench_faults(
    repository: Repository = MODEL_REPOSITORY,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    fuzz_per_model: Annotated[int, typer.Option(help="malformed requests per model")] = 150,
) -> None:
    """Faults, measured: a killed stage process under load (back in how long, calls lost),
    a server restart under load, and malformed requests to every model beside good
    ones; writes faults.md/.json."""
    require("bench", "bench-faults")
    from dynemb.bench.faults import bench_faults as run_faults
    from dynemb.bench.faults import render_markdown

    result = run_faults(
        repository, out_dir, cache_dir(), fuzz_per_model=fuzz_per_model, say=console.print
    )
    console.print(render_markdown(result).split("## Context")[0])


@app.command(name="bench-sessions")
def bench_sessions(
    repository: Repository = MODEL_REPOSITORY,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    quick: Annotated[bool, typer.Option(help="smoke run: 64 users, 3 s per point")] = False,
    hold: Annotated[int, typer.Option(help="events that start each session, untimed")] = 10,
    past: Annotated[int, typer.Option(min=1, help="events streamed past the window")] = 50,
) -> None:
    """One new event with sessions vs a recompute, within the window and past it,
    in-process and served, in one run (MovieLens-100k and SYNTHETIC users with images);
    writes sessions.md/.json."""
    from dynemb.bench.sessions import SessionBenchOptions, check_hold
    from dynemb.bench.sessions import bench_sessions as run
    from dynemb.errors import UsageError

    try:
        check_hold(hold)  # before the histories load
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint="--hold") from None
    options = SessionBenchOptions(repository=repository, out_dir=out_dir, hold=hold, past=past)
    if quick:
        options.quick, options.max_seconds, options.warmup_calls = True, 3.0, 4
        options.max_users, options.concurrencies = 64, (1, 8)
        options.stem = "sessions-quick"
    result = run(options, say=console.print)
    for data in result.results:
        for phase in data.phases:
            ratios = {k: round(v, 2) for k, v in phase.ratios.items()}
            console.print(f"{data.data}, {phase.phase}: {ratios}")
    console.print(f"wrote {options.out_dir / options.stem}.md and .json")


@app.command()
def bench_replicas(
    repository: Repository = MODEL_REPOSITORY,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    replicas: Annotated[int, typer.Option(min=2)] = 3,
    trials: Annotated[int, typer.Option(min=1, help="kills, one replica after another")] = 3,
) -> None:
    """Failover under a 16-caller load: SIGKILL one replica, start it again; failed calls,
    how fast its share moves and how fast it rejoins (writes replicas.md/.json)."""
    from dynemb.bench.replicas import ReplicaBenchOptions
    from dynemb.bench.replicas import bench_replicas as run

    result = run(
        ReplicaBenchOptions(repository, out_dir, replicas=replicas, trials=trials),
        say=console.print,
    )
    for name, measured, ok in result.targets:
        console.print(f"{'met' if ok else 'MISSED':6} {name}: {measured}")


@app.command(name="bench-embed-all")
def bench_embed_all(
    repository: Repository = MODEL_REPOSITORY,
    out_dir: Annotated[Path, typer.Option(help="where the results go")] = RESULTS_DIR,
    users: Annotated[int, typer.Option(min=1, help="SYNTHETIC users to embed")] = 20_000,
    files: Annotated[int, typer.Option(min=1, help="events files they are spread over")] = 16,
    workers: Annotated[int, typer.Option(min=1)] = os.cpu_count() or 1,
) -> None:
    """`dynemb embed-all` on Ray against the same work in-process, same cores, one run
    (writes embed_all.md/.json)."""
    require("ray", "bench-embed-all")
    from dynemb.bench.bulk import BulkBenchOptions
    from dynemb.bench.bulk import bench_embed_all as run

    work = cache_dir() / "bench-embed-all"
    result = run(
        BulkBenchOptions(repository, out_dir, work, users=users, files=files, workers=workers),
        say=console.print,
    )
    for name, measured, ok in result.targets:
        console.print(f"{'met' if ok else 'MISSED':6} {name}: {measured}")


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
    url: Annotated[
        list[str],
        typer.Option(
            "--url",
            help="gRPC endpoint host:port; several: replicas of one repository, swapped one "
            "at a time and all rolled back if one fails",
        ),
    ] = ["127.0.0.1:8001"],  # noqa: B006 (typer reads the default, never mutates it)
) -> None:
    """Check, probe drift, install as the next version, load, verify; restore on failure."""
    if len(url) == 1:
        swapper = _swapper(repository, url[0])
        result = swapper.swap(stage, artifact, accept_drift=accept_drift, progress=console.print)
        switched = [(url[0], result.seconds)]
    else:
        from dynemb.control import load_token
        from dynemb.swap.rolling import RollingSwapper

        roller = RollingSwapper(repository, url, token=load_token(create=False))
        result = roller.swap(stage, artifact, accept_drift=accept_drift, progress=console.print)
        switched = result.switched
    print(
        json.dumps(
            {
                "stage": stage,
                "old": result.old_version,
                "new": result.new_version,
                "drift": result.drift.as_dict() if result.drift else None,
                "seconds": round(result.seconds, 2),
                "replicas": [{"url": u, "seconds": round(t, 2)} for u, t in switched],
            }
        )
    )


@app.command()
def rollback(
    stage: str,
    to: Annotated[int | None, typer.Option(help="version to serve again (default: parent)")] = None,
    repository: Repository = MODEL_REPOSITORY,
    url: Annotated[
        list[str],
        typer.Option(
            "--url", help="gRPC endpoint host:port; several: replicas, rolled one at a time"
        ),
    ] = ["127.0.0.1:8001"],  # noqa: B006 (typer reads the default, never mutates it)
) -> None:
    """Serve an earlier version of STAGE again (installed as a new, newest version)."""
    if len(url) == 1:
        result = _swapper(repository, url[0]).rollback(stage, to, progress=console.print)
    else:
        from dynemb.control import load_token
        from dynemb.swap.rolling import RollingSwapper

        roller = RollingSwapper(repository, url, token=load_token(create=False))
        result = roller.rollback(stage, to, progress=console.print)
    print(json.dumps({"stage": stage, "old": result.old_version, "new": result.new_version}))


@app.command()
def versions(
    repository: Repository = MODEL_REPOSITORY,
    url: Annotated[
        list[str] | None,
        typer.Option(
            "--url",
            help="ask these servers (host:port, repeatable) which version of each stage "
            "their answers come from, instead of reading the repository",
        ),
    ] = None,
) -> None:
    """Each stage's versions with manifest summaries; * marks the one serving. With
    --url: the versions each server's answers report, one line per server."""
    if url:
        from dynemb.queries import served_versions
        from dynemb_client import ServerError as ClientServerError

        unanswered = 0
        for endpoint in url:  # one line each, a replica that is down included
            try:
                served = served_versions(endpoint)
            except ClientServerError as exc:
                unanswered += 1
                print(f"{endpoint}  no answer: {exc}")
                continue
            print(f"{endpoint}  " + "  ".join(f"{s}=v{v}" for s, v in served.items()))
        if unanswered:
            raise typer.Exit(1)
        return
    from dynemb.swap.swapper import list_versions

    for row in list_versions(repository):
        mark = "*" if row.serving else " "
        print(
            f"{mark} {row.stage:<14} v{row.version:<3} {row.state:<10} {row.created}  {row.summary}"
        )


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
    main()
