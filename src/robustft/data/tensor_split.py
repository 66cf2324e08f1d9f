"""In-memory splits (the built-in benchmark): uint8 images held as one tensor, batched by indexing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class TensorSplit(Dataset):
    """uint8 images ``[N, 3, H, W]`` + labels, normalised (and resized) to a backbone's data config.

    Indexing with a list of indices returns a whole batch at once, so loaders skip per-sample
    collation; that keeps the CPU benchmark fast.
    """

    supports_batch_indexing = True

    def __init__(self, images: Tensor, labels: Tensor, data_config: dict[str, Any], name: str = "") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"split '{name}': expected uint8 images [N, 3, H, W], got {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.name = name
        self.input_size = tuple(data_config.get("input_size", (3, *images.shape[2:])))[1:]
        self.mean = torch.tensor(data_config.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _to_input(self, images: Tensor) -> Tensor:
        images = images.float() / 255.0
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    def __getitem__(self, index: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(index, int):
            return self._to_input(self.images[index : index + 1])[0], self.labels[index]
        index = torch.as_tensor(index, dtype=torch.long)
        return self._to_input(self.images[index]), self.labels[index]
