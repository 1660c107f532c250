"""Joint training of all stages for next-item prediction with a full softmax over items.

Loss at every position: the stages are causal (per-event features read no later event,
the temporal LSTM runs forward, MiniLM attends causally), so one pass over a window of a
user's training events yields E after every prefix of it, each asked at the time of the
next event, and the cross-entropy over all items is taken at every one of them
(`ExampleBuilder.windows`). Each output is exactly what the server answers for that
prefix and query time (a unit test checks it against the request path).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dynemb.checkpoint import Checkpoint
from dynemb.data.types import Dataset
from dynemb.dims import DIMS, Dims
from dynemb.errors import UsageError
from dynemb.evaluation.metrics import evaluate_scores
from dynemb.evaluation.seen import exclude_seen
from dynemb.evaluation.split import Split, Which, leave_one_out
from dynemb.joint import JointModel
from dynemb.manifest import Provenance
from dynemb.stages.llm_encoder import MINILM_LAYERS
from dynemb.training.examples import (
    ExampleBuilder,
    Window,
    collate,
    collate_windows,
    seen_items,
)
from dynemb.training.loop import EpochReport, EpochStats, run_epochs
from dynemb.training.model import TrainModel, Variant, build_joint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """Defaults chosen on ML-100k validation NDCG@10 (seed 0; the runs are listed in
    benchmarks/results/training-choices-ml100k.md)."""

    seed: int = 0
    max_minutes: float = 25.0  # wall-clock budget of the training loop (validation included)
    max_epochs: int = 16  # also the length of the cosine schedule
    patience: int = 10  # epochs without a better validation NDCG@10
    windows: str = "all"  # "all": every training event is a target; "last": newest L+1 only
    cosine: bool = True  # learning rate decays along a half cosine over max_epochs
    batch_size: int = 32  # windows per step (32 over 64: training-choices, seventh round)
    lr: float = 2e-3
    weight_decay: float = 0.0
    dropout: float = 0.0  # on each event's text/image/label vectors, training only
    # Lookup tables (label/id embeddings, item ids and biases) learn 10x faster: at `lr`
    # their N(0, 1) rows barely move in the ~40 steps of an epoch, which is most of the
    # initial popularity plateau.
    embedding_lr: float | None = 2e-2
    scale: float = 20.0  # softmax temperature 1/tau on cosine scores
    # Leave the user's earlier items out of the training softmax, as the protocol's ranking
    # does (dynemb.evaluation.seen); valid NDCG@10 0.1388 vs 0.1193 (seed 0).
    exclude_seen: bool = True
    llm_layers: int = MINILM_LAYERS  # kept (pretrained, frozen weights; grads flow through)
    llm_trainable: bool = False
    llm_lr: float | None = None  # learning rate of MiniLM's own weights when trainable
    variant: Variant = field(default_factory=Variant)
    num_threads: int = 2
    progress: bool = True
    deterministic: bool = True
    valid_users: int | None = None  # cap on validation users per epoch (None = all)
    only: str | None = None  # fine-tune this stage of `init`, every other weight frozen
    # Weight of a second cross-entropy against the content-only item table (every id row
    # withheld: what a brand-new item gets), so that content and title alone can rank. It
    # reads E_t detached: it trains the item side only (through the user side too, it cost
    # validation NDCG@10: benchmarks/results/training-choices-ml100k.md).
    content_loss: float = 8.0


@dataclass
class Trained:
    """Everything evaluation needs besides the Checkpoint: the split, the example builder
    (with its cache) and the training model."""

    model: TrainModel
    builder: ExampleBuilder
    split: Split
    options: TrainOptions
    epochs: list[EpochReport]
    best_epoch: int
    best_valid_ndcg10: float
    seconds: float

    def checkpoint(self, dataset: Dataset) -> Checkpoint:
        provenance = Provenance(
            data=dataset.name,
            synthetic=dataset.synthetic,
            seed=self.options.seed,
            options=_jsonable(asdict(self.options)),
            best_epoch=self.best_epoch,
            valid_ndcg10=self.best_valid_ndcg10,
            train_seconds=round(self.seconds, 1),
            item_labels=self.builder.item_labels,
            query_time="time of the target event",
        )
        return Checkpoint(
            self.model.joint.eval(),
            self.builder.labels,
            self.split.item_ids[1:],
            provenance,
            trained=True,
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _embedding_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights of the id/label lookup tables (their rows move only when looked up)."""
    kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    return [m.weight for m in model.modules() if isinstance(m, kinds)]


def make_optimizer(model: TrainModel, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW over the trainable weights in up to three groups: lookup tables at
    `embedding_lr`, MiniLM's own weights (when trainable) at `llm_lr`, the rest at `lr`."""
    bert = model.llm_parameters()
    in_bert = {id(p) for p in bert}
    tables = [p for p in _embedding_tables(model) if p.requires_grad and id(p) not in in_bert]
    if not options.embedding_lr:
        tables = []
    taken = in_bert | {id(p) for p in tables}
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken]},
        {"params": tables, "lr": options.embedding_lr},
        {"params": [p for p in bert if p.requires_grad], "lr": options.llm_lr or options.lr},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)


def seed_everything(seed: int, threads: int, deterministic: bool) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def train(dataset: Dataset, options: TrainOptions | None = None) -> Checkpoint:
    """Train on `dataset`'s leave-one-out training events; the Checkpoint `dynemb build` exports."""
    options = options or TrainOptions()
    return fit(dataset, leave_one_out(dataset), options).checkpoint(dataset)


def fit(
    dataset: Dataset,
    split: Split,
    options: TrainOptions,
    on_epoch: Callable[[EpochReport], None] | None = None,
    dims: Dims = DIMS,
    builder: ExampleBuilder | None = None,
    users: np.ndarray | None = None,
    init: JointModel | None = None,
) -> Trained:
    """The training run; returns the best epoch's weights by validation NDCG@10.

    `users` restricts training and validation to those split rows (others stay unseen);
    `init` starts from a trained model instead of seeded weights (with `options.only`,
    only that stage learns).
    """
    seed_everything(options.seed, options.num_threads, options.deterministic)
    started = time.perf_counter()
    deadline = started + 60.0 * options.max_minutes
    builder = example_builder(dataset, split, dims, options.variant, builder)
    model = training_model(builder, split, dims, options, init)
    optimizer = make_optimizer(model, options)
    rng = np.random.default_rng(options.seed)
    windows, valid_users = training_data(builder, split, options, users, rng)
    scheduler = cosine_schedule(optimizer, options, len(windows))
    bar = tqdm(desc="train", unit="target", disable=not options.progress, dynamic_ncols=True)

    def train_epoch(epoch: int) -> EpochStats:
        order = rng.permutation(len(windows))
        total, seen = 0.0, 0
        for start in range(0, len(order), options.batch_size):
            chunk = [windows[i] for i in order[start : start + options.batch_size]]
            loss, count = train_step(model, chunk, split.n_items, options, optimizer, scheduler)
            total += loss * count
            seen += count
            bar.update(count)
            bar.set_postfix(epoch=epoch, loss=f"{total / seen:.3f}")
            if time.perf_counter() > deadline:
                return EpochStats(total / max(seen, 1), seen, out_of_time=True)
        return EpochStats(total / max(seen, 1), seen)

    def validate() -> float:
        return score_split(model, builder, "valid", users=valid_users)["ndcg@10"]

    def report(epoch: EpochReport) -> None:
        bar.set_postfix(
            epoch=epoch.epoch, loss=f"{epoch.loss:.3f}", best=f"{epoch.best_ndcg10:.4f}"
        )
        if on_epoch is not None:
            on_epoch(epoch)

    result = run_epochs(
        model, train_epoch, validate, options.max_epochs, options.patience, report, started
    )
    bar.close()
    return Trained(
        model,
        builder,
        split,
        options,
        result.epochs,
        result.best_epoch,
        result.best_valid_ndcg10,
        result.seconds,
    )


def example_builder(
    dataset: Dataset, split: Split, dims: Dims, variant: Variant, builder: ExampleBuilder | None
) -> ExampleBuilder:
    """`builder` when it fits the variant (its example cache is reused), else a new one."""
    if builder is None or builder.item_labels != variant.item_ids:
        builder = ExampleBuilder(dataset, split, dims, item_labels=variant.item_ids)
    return builder


def training_model(
    builder: ExampleBuilder,
    split: Split,
    dims: Dims,
    options: TrainOptions,
    init: JointModel | None,
) -> TrainModel:
    """Seeded (or `init`'s) joint model in its training wrapper, with what must not learn
    frozen: MiniLM's own weights unless `llm_trainable`, every stage but `options.only`."""
    variant = options.variant
    if init is None:
        n_items = split.n_items if variant.item_ids else 0
        joint = build_joint(dims, len(builder.labels), n_items, options.llm_layers, options.seed)
        if not variant.pretrained_text:  # a word-piece vocabulary learned from scratch
            embed = joint.stages["text_rnn"].embed
            torch.nn.init.normal_(embed.weight, std=embed.embedding_dim**-0.5)
            embed.weight.data[embed.padding_idx] = 0.0
    else:
        joint = copy.deepcopy(init)
    model = TrainModel(
        joint, builder.tables, builder.items, variant, options.scale, options.dropout
    )
    model.withheld[torch.from_numpy(split.withheld - 1)] = True
    model.freeze(options.llm_trainable)
    if options.only is not None:
        if init is None or options.only not in joint.stages:
            raise ValueError("`only` fine-tunes one stage of a trained model: pass `init`")
        for name, param in model.named_parameters():
            param.requires_grad_(
                param.requires_grad and name.startswith(f"joint.stages.{options.only}.")
            )
    return model


def training_data(
    builder: ExampleBuilder,
    split: Split,
    options: TrainOptions,
    users: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[list[Window], np.ndarray]:
    """The training windows of `users` (default: all) and the users validated each epoch."""
    pool = range(split.n_users) if users is None else [int(u) for u in users]
    valid_users = split.eval_users
    if users is not None:
        valid_users = np.intersect1d(valid_users, np.asarray(users))
    trained = [u for u in pool if len(builder.train_cuts(u)) > 0]
    windows = [w for u in trained for w in builder.windows(u, options.windows)]
    # Said before anything runs: with neither, an epoch divided by zero or scored nothing.
    if not windows:
        raise UsageError(
            "nothing to train on: no user has a training event after another (a user with "
            "3 or more events keeps its newest two for validation and test, so it needs 4)"
        )
    if not len(valid_users):
        raise UsageError(
            "nothing to validate on: no user has the 3 events that training, validation "
            "and test need (the best epoch is chosen on validation)"
        )
    if options.valid_users is not None and options.valid_users < len(valid_users):
        valid_users = np.sort(rng.choice(valid_users, options.valid_users, replace=False))
    return windows, valid_users


def cosine_schedule(
    optimizer: torch.optim.Optimizer, options: TrainOptions, n_windows: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Half a cosine from the full rate to zero over `max_epochs` epochs (None: constant)."""
    if not options.cosine:
        return None
    steps = options.max_epochs * -(-n_windows // options.batch_size)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    )


def train_step(
    model: TrainModel,
    chunk: list[Window],
    n_items: int,
    options: TrainOptions,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR | None,
) -> tuple[float, int]:
    """One optimiser step on a batch of windows: cross-entropy over all items at every
    prefix with a target (plus `content_loss` x the same against the content-only item
    table); returns (mean loss, number of targets)."""
    batch = collate_windows(chunk)
    text, image = model.text_table(), model.image_table()
    real = batch.target > 0
    users_e = model.window_embeddings(batch, text, image)[torch.from_numpy(real)]
    target = torch.from_numpy(batch.target[real]) - 1
    had = torch.from_numpy(seen_items(chunk, n_items)[real]) if options.exclude_seen else None
    content = model.item_content(text, image)
    loss = item_loss(model, users_e, target, had, model.tower(content))
    if options.content_loss:
        content_only = model.tower(content, with_ids=False)
        loss = loss + options.content_loss * item_loss(
            model, users_e.detach(), target, had, content_only
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item(), len(target)


def item_loss(
    model: TrainModel,
    users: torch.Tensor,
    target: torch.Tensor,
    had: torch.Tensor | None,
    items: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Cross-entropy over every item that exists in training (withheld items are out of
    the softmax); with `had`, the user's earlier items too, except the target."""
    logits = model.logits(users, *items)
    if had is not None:
        logits = exclude_seen(logits, had, target)
    logits = logits.masked_fill(model.withheld, float("-inf"))
    return F.cross_entropy(logits, target)


@torch.inference_mode()
def user_vectors(
    model: TrainModel, builder: ExampleBuilder, keys: list[tuple], batch_size: int = 128
) -> np.ndarray:
    """E_t for (user, cut[, query_time]) keys, in order."""
    model.eval()
    text, image = model.text_table(), model.image_table()
    out = []
    for start in range(0, len(keys), batch_size):
        batch = collate([builder.example(*key) for key in keys[start : start + batch_size]])
        out.append(model.user_embedding(batch, text, image).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.joint.dims.embed_dim), np.float32)


@torch.inference_mode()
def item_table(model: TrainModel, with_ids: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The retrieve table the model would export: (n_items, D) vectors, (n_items,) biases."""
    model.eval()
    vectors, bias = model.items(model.text_table(), model.image_table(), with_ids=with_ids)
    return vectors.numpy(), bias.numpy()


def scores_for(
    model: TrainModel,
    builder: ExampleBuilder,
    which: Which,
    users: np.ndarray,
    with_ids: bool = True,
    limit: int | Sequence[int] | None = None,
) -> np.ndarray:
    """(len(users), n_items + 1) cosine scores (column 0 = padding, -inf). `limit`: the
    newest events each user sends, one number for all or one per user."""
    limits = [limit] * len(users) if limit is None or isinstance(limit, int) else list(limit)
    if len(limits) != len(users):
        raise ValueError(f"{len(limits)} limits for {len(users)} users")
    keys = [
        (int(u), builder.eval_cut(int(u), which), None, cap)
        for u, cap in zip(users, limits, strict=True)
    ]
    vectors, bias = item_table(model, with_ids)
    scores = user_vectors(model, builder, keys) @ vectors.T + bias[None, :]
    return np.concatenate([np.full((len(users), 1), -np.inf, np.float32), scores], axis=1)


def score_split(
    model: TrainModel,
    builder: ExampleBuilder,
    which: Which,
    users: np.ndarray | None = None,
    exclude_seen: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of `which` targets for `users` (default: all evaluated users)."""
    split = builder.split
    users = split.eval_users if users is None else users
    scores = scores_for(model, builder, which, users)
    targets = (split.valid if which == "valid" else split.test)[users]
    histories = [split.history(int(u), which) for u in users] if exclude_seen else None
    return evaluate_scores(scores, targets, histories, ks=(10, 20))
