"""image_cnn: a small CNN over each event's image -> one vector per event."""

from __future__ import annotations

import torch
from torch import nn

from dynemb.dims import Dims
from dynemb.stages.image_cnn import ImageCNNParams


class ImageCNN(nn.Module):
    """Three conv blocks and global pooling. An event without an image is masked: it gets a
    learned "no image" vector, never the features of an all-black picture."""

    def __init__(self, dims: Dims, params: ImageCNNParams) -> None:
        super().__init__()
        self.dims = dims
        width = params.width
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, dims.image_dim),
        )
        self.norm = nn.LayerNorm(dims.image_dim)
        self.missing = nn.Parameter(torch.zeros(dims.image_dim))

    def forward(self, pixels: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, 3, S, S) uint8, (B, L) bool -> (B, L, image_dim)."""
        batch, events = image_mask.shape
        flat = pixels.reshape(batch * events, *pixels.shape[2:])
        mask = image_mask.reshape(-1)
        out = self.missing.expand(batch * events, -1).clone()
        if bool(mask.any()):
            out[mask] = self.encode(flat[mask])
        return out.reshape(batch, events, self.dims.image_dim)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 real images -> (N, image_dim), one image per row (what serving
        caches per image and exports to ONNX)."""
        return self.norm(self.net(pixels.float() / 127.5 - 1.0))


class ImageRows(nn.Module):
    """The served function: one image per row, the "no image" vector where not `mask`."""

    def __init__(self, network: ImageCNN) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.unsqueeze(-1), self.network.encode(pixels), self.network.missing)


class ImageEvents(nn.Module):
    """The stage-level function (`stage.onnx`): (B, L, 3, S, S) uint8, (B, L) bool -> (B, L,
    image_dim), every event's picture through `ImageRows` at once (an event without an image
    gets the learned "no image" vector). The same function as `ImageCNN.forward`, at fixed
    shapes (it computes the CNN for absent images too and discards it)."""

    def __init__(self, network: ImageCNN) -> None:
        super().__init__()
        self.rows = ImageRows(network)
        self.dims = network.dims

    def forward(self, pixels: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        d = self.dims  # constants, so that the export's dims are fixed
        flat = pixels.reshape(-1, 3, d.image_size, d.image_size)
        return self.rows(flat, image_mask.reshape(-1)).reshape(-1, d.max_events, d.image_dim)
