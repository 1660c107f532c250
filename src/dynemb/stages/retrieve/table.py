"""Build the item table at `dynemb build`: every catalogue item's content through the same
preprocess / text / image / label stages as events, its title through the pretrained
MiniLM (`llm_encoder.sentences`), then the item tower (torch)."""

from __future__ import annotations

import numpy as np
import torch

from dynemb.checkpoint import Checkpoint
from dynemb.data.types import Dataset, Item
from dynemb.errors import InputError, UsageError
from dynemb.stages.llm_encoder.sentences import SENTENCE_DIM, sentence_embeddings, weights_installed
from dynemb.stages.preprocess import assets_for
from dynemb.stages.preprocess.features import Preprocessor
from dynemb.stages.retrieve.items import ItemTable

ITEM_BATCH = 256


def title_embeddings(checkpoint: Checkpoint, titles: list[str]) -> np.ndarray:
    """The titles' sentence embeddings; zeros only for an untrained, seeded checkpoint on a
    machine without MiniLM's weights (a trained one was trained with them, and refuses)."""
    if checkpoint.trained or weights_installed():
        return sentence_embeddings(titles)
    return np.zeros((len(titles), SENTENCE_DIM), np.float32)


def _item_inputs(preprocessor: Preprocessor, chunk: list[Item]) -> dict[str, np.ndarray]:
    """The chunk's preprocessed content; content it cannot take (an image that does not
    decode) is the catalogue's error, naming the item (it was a traceback naming a row)."""

    def of(items: list[Item]) -> dict[str, np.ndarray]:
        return preprocessor.items(
            [i.title for i in items], [i.image for i in items], [list(i.labels) for i in items]
        )

    try:
        return of(chunk)
    except InputError:
        for item in chunk:  # which one: each alone
            try:
                of([item])
            except InputError as exc:  # its field names a row of the batch: not said
                raise UsageError(
                    f"catalogue item {item.item_id!r} ({item.title[:60]!r}): {exc.reason}"
                ) from None
        raise


@torch.inference_mode()
def build_item_table(checkpoint: Checkpoint, catalogue: Dataset) -> ItemTable:
    """Unit vectors and score biases of the catalogue's items, in catalogue order; an item
    the checkpoint has no id row for is scored by its content and title alone."""
    model = checkpoint.model.eval()
    preprocessor = Preprocessor(assets_for(checkpoint))
    index = {item_id: i + 1 for i, item_id in enumerate(checkpoint.item_ids)}
    items = list(catalogue.items.values())
    titles = torch.from_numpy(title_embeddings(checkpoint, [i.title for i in items]))
    vectors, bias = [], []
    for start in range(0, len(items), ITEM_BATCH):
        chunk = items[start : start + ITEM_BATCH]
        x = _item_inputs(preprocessor, chunk)
        content = model.item_content({k: torch.from_numpy(v) for k, v in x.items()})
        title = titles[start : start + ITEM_BATCH]
        ids = torch.tensor([index.get(i.item_id, 0) for i in chunk])
        vectors.append(model.item_tower(content, title, ids).numpy())
        bias.append(model.item_tower.item_bias(content, title, ids).numpy())
    return ItemTable(
        [i.item_id for i in items],
        [i.title for i in items],
        np.concatenate(vectors),
        np.concatenate(bias).astype(np.float32),
    )
