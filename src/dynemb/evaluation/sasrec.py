"""SASRec (Kang & McAuley, 2018), compact, trained with a full softmax over all items.

The reference point for every learned model in dynemb: a causal transformer over item ids
only. Item embedding (scaled by sqrt(d)) + learned position embedding (positions counted
from the right, so the newest event always has the same one), pre-norm blocks
x + Dropout(Sublayer(LayerNorm(x))) as in the paper, a final LayerNorm, and the item
embedding reused as the output layer. Unlike the paper's one sampled negative, the loss
is cross-entropy over all items at every position (as in later re-evaluations of SASRec,
which found it much stronger). Early stopping reads validation NDCG@10 only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dynemb.evaluation.metrics import evaluate_scores
from dynemb.evaluation.seen import exclude_seen, seen_before
from dynemb.evaluation.split import PAD, Split, Which
from dynemb.training.loop import EpochReport, EpochStats, run_epochs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50  # events read per user, most recent last
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    # "last": one window per user, the newest max_len+1 train events (the paper's choice);
    # "all": every train event is a target once (long histories cut into windows).
    windows: Literal["last", "all"] = "last"
    select_exclude_seen: bool = True  # validation metric masks already-seen items
    # Leave the user's earlier items out of the training softmax (dynemb.evaluation.seen).
    exclude_seen: bool = False
    # torch intra-op threads. 2 is ~1.4x faster than 1 on an idle 2-core machine, but 2-7x
    # slower when another process holds a core (threads wait on each other at every op).
    num_threads: int = 2


@dataclass
class TrainingLog:
    config: SASRecConfig
    seed: int
    epochs: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_ndcg10: float = float("-inf")
    seconds: float = 0.0


class Block(nn.Module):
    """Pre-norm causal self-attention + point-wise feed-forward, each with a residual."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout_p = dropout
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed`: (B, 1, L, L) bool, True where query i may read key j."""
        batch, length, hidden = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x))
            .view(batch, length, 3, self.heads, hidden // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        dropout_p = self.dropout_p if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        h = self.attn_out(h.transpose(1, 2).reshape(batch, length, hidden))
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.config = config
        self.item_emb = nn.Embedding(n_items + 1, config.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.hidden, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden)
        self.log: TrainingLog | None = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal init (as GPT-2/RecBole): the item table is also the output layer, and
        # N(0, 1) rows make the initial softmax logits ~±50 and the first epochs wasted.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item indices -> (B, L, hidden) states; state i has read 0..i."""
        length = seq.shape[1]
        real = seq != PAD
        positions = torch.arange(length, device=seq.device) + (self.config.max_len - length)
        x = self.item_emb(seq) * math.sqrt(self.config.hidden) + self.pos_emb(positions)
        x = self.emb_dropout(x) * real.unsqueeze(-1)
        # Causal, and padding keys are unreadable; a padding query reads itself (no empty row).
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=seq.device)
        allowed = (causal & (real.unsqueeze(1) | diagonal)).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)

    def item_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Scores of items 1..n_items (no padding column) for each state."""
        return states @ self.item_emb.weight[1:].T


def _pad_left(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail) :] = tail
    return out


def training_windows(
    split: Split, max_len: int, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, origins): inputs and targets (N, max_len) left-padded, targets[i, j]
    following inputs[i, :j+1]; origins (N, 2) = (user, offset) such that position j of row i
    has read the user's training events [0, offset + j] (what `_seen` masks).

    Built from `split.train` only, so validation and test items never reach the loss.
    """
    if mode not in ("last", "all"):
        raise ValueError(f"windows must be 'last' or 'all', got {mode!r}")
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    origins: list[tuple[int, int]] = []
    for user, seq in enumerate(split.train):
        if len(seq) < 2:
            continue
        ends = [len(seq)] if mode == "last" else list(range(len(seq), 1, -max_len))
        for end in ends:
            start = max(0, end - max_len - 1)
            window = seq[start:end]
            inputs.append(window[:-1])
            targets.append(window[1:])
            origins.append((user, start - (max_len - (len(window) - 1))))
    return (
        _pad_left(inputs, max_len),
        _pad_left(targets, max_len),
        np.array(origins, np.int64).reshape(-1, 2),
    )


def _seen(split: Split, origins: np.ndarray, max_len: int) -> torch.Tensor:
    """(B * max_len, n_items) bool: the items each training position's user had before it."""
    positions = 1 + np.arange(max_len)
    return torch.from_numpy(
        np.concatenate(
            [
                seen_before(split.train[user], offset + positions, split.n_items)
                for user, offset in origins
            ]
        )
    )


@torch.no_grad()
def score_histories(
    model: SASRec, histories: Sequence[np.ndarray], batch_size: int = 512
) -> np.ndarray:
    """(n, n_items + 1) scores from each history's newest state; column 0 is -inf."""
    was_training = model.training
    model.eval()
    max_len = model.config.max_len
    out = np.full((len(histories), model.n_items + 1), -np.inf, np.float32)
    for start in range(0, len(histories), batch_size):
        seq = torch.from_numpy(_pad_left(histories[start : start + batch_size], max_len))
        states = model(seq)[:, -1]
        out[start : start + len(seq), 1:] = model.item_logits(states).numpy()
    model.train(was_training)
    return out


def score_sasrec(model: SASRec, split: Split, which: Which = "test") -> np.ndarray:
    """Scores for `split.eval_users` predicting `which`; rows match `split.targets(which)`."""
    return score_histories(model, split.histories(which))


def _valid_ndcg10(model: SASRec, split: Split, exclude_seen: bool) -> float:
    histories = split.histories("valid")
    scores = score_histories(model, histories)
    seen = histories if exclude_seen else None
    return evaluate_scores(scores, split.targets("valid"), seen, ks=(10,))["ndcg@10"]


def train_sasrec(
    split: Split,
    config: SASRecConfig | None = None,
    seed: int = 0,
    progress: Callable[[EpochReport], None] | None = None,
) -> SASRec:
    """Train on `split.train`, stop early on validation NDCG@10, return the best epoch's model.

    Deterministic for a given seed and thread count (torch and numpy are both seeded).
    The returned model carries its `TrainingLog` in `model.log`.
    """
    config = config or SASRecConfig()
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    inputs, targets, origins = training_windows(split, config.max_len, config.windows)
    if len(inputs) == 0:
        raise ValueError("no user has two or more training events")
    model = SASRec(split.n_items, config)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    logger.info("SASRec: %d training windows, %d items, %s", len(inputs), split.n_items, config)

    def train_epoch(epoch: int) -> EpochStats:
        order = rng.permutation(len(inputs))
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            seq = torch.from_numpy(inputs[rows])
            target = torch.from_numpy(targets[rows])
            logits = model.item_logits(model(seq)).flatten(0, 1)
            # Items are 1..n in the index, 0..n-1 among the logits; padding becomes -1.
            target = target.flatten() - 1
            if config.exclude_seen:
                logits = exclude_seen(logits, _seen(split, origins[rows], config.max_len), target)
            loss = F.cross_entropy(logits, target, ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = int((target >= 0).sum())
            total += loss.item() * n
            count += n
        return EpochStats(total / max(count, 1), count)

    result = run_epochs(
        model,
        train_epoch,
        lambda: _valid_ndcg10(model, split, config.select_exclude_seen),
        config.max_epochs,
        config.patience,
        progress,
    )
    model.log = TrainingLog(
        config, seed, result.epochs, result.best_epoch, result.best_valid_ndcg10, result.seconds
    )
    logger.info(
        "SASRec seed %d: best epoch %d of %d, valid ndcg@10 %.4f, %.1f s",
        seed,
        result.best_epoch,
        len(result.epochs),
        result.best_valid_ndcg10,
        result.seconds,
    )
    return model
