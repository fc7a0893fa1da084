"""Embeddings of a whole data set by a frozen encoder: the one loop every probe and study uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from launcher.data import BaseDataset
from launcher.data.sampling import SeededDataset, sample_seeds

Encode = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> embeddings [B, D]


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


class FeatureCache(Dataset):
    """A training set whose samples carry a frozen encoder's features instead of images.

    For a method whose ``features(images)`` do not change while it trains (a linear probe on a
    frozen encoder, no augmentation), every sample is encoded once here and the head trains on
    the stored features: the same steps as re-running the encoder every step, at the cost of
    one pass over the data. Keys are those of ``SeededDataset`` ((index, epoch) pairs).
    """

    def __init__(self, dataset: SeededDataset, features: Encode, device: torch.device | str, batch_size: int = 256):
        self.dataset = dataset
        indices = np.arange(len(dataset.base))
        x, labels = embed_dataset(features, dataset.base, dataset.transform, indices, device, batch_size)
        self.features, self.labels = torch.from_numpy(x), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, epoch = key
        _, model_seed = sample_seeds(self.dataset.seed, epoch, index)
        return {"features": self.features[index], "label": self.labels[index], "seed": model_seed, "index": index}
