"""Embeddings of a whole data set by a frozen encoder: the one loop every probe and study uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from launcher.data import BaseDataset
from methods.vit import grid_pool

Encode = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> embeddings [B, D]


def pooled_patch_tokens(model: nn.Module, grid: int) -> Encode:
    """The model's patch tokens averaged over ``grid x grid`` cells (``embed()`` when ``grid`` is 0).

    Cells keep where things are (LunarLander's lander), which a global mean forgets.
    """
    if grid == 0:
        return model.embed

    def encode(images: Tensor) -> Tensor:
        tokens = model.patch_tokens(images)
        return grid_pool(tokens, round(tokens.shape[1] ** 0.5), grid)

    return encode


@torch.no_grad()
def embed_dataset(
    encode: Encode,
    dataset: BaseDataset,
    transform: Callable,
    indices: Sequence[int],
    device: torch.device | str,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings ``[N, D]`` float32, labels ``[N, ...]``) of ``dataset[indices]``, in that order.

    Modules inside ``encode`` must be in eval mode; nothing is augmented (pass the evaluation
    transform).
    """
    embeddings, labels = [], []
    for start in range(0, len(indices), batch_size):
        samples = [dataset[int(i)] for i in indices[start : start + batch_size]]
        images = torch.stack([transform(image) for image, _ in samples]).to(device)
        embeddings.append(encode(images).float().cpu().numpy())
        labels.append(np.stack([label.numpy() for _, label in samples]))
    return np.concatenate(embeddings), np.concatenate(labels)
