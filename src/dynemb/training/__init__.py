"""Joint training of the five stages, evaluation against baselines, and the dynamics study."""

from dynemb.training.examples import ExampleBuilder, item_label, to_client_event
from dynemb.training.model import TrainModel, Variant
from dynemb.training.train import Trained, TrainOptions, fit, train

__all__ = [
    "ExampleBuilder",
    "TrainModel",
    "TrainOptions",
    "Trained",
    "Variant",
    "fit",
    "item_label",
    "to_client_event",
    "train",
]
