"""Random draws that are a function of per-sample seeds.

Each sample of a batch carries its own seed (``batch["seed"]``, derived by the data pipeline
from the run's seed, the epoch and the sample index), so a sample's masks or noise do not
depend on how a batch is split over processes, and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor


@torch.compiler.disable  # host-side generators: a compiled forward calls this as it is
def per_sample_noise(
    seeds: Tensor, n: int, device: torch.device | str, distribution: Literal["uniform", "normal"] = "uniform"
) -> Tensor:
    """Noise ``[B, n]`` whose row ``i`` depends only on ``seeds[i]``: U[0, 1) or N(0, 1).

    Drawn on the host, from host seeds (the trainer leaves ``batch["seed"]`` there), and copied
    to ``device`` without waiting: no synchronisation with a GPU.
    """
    draw = torch.rand if distribution == "uniform" else torch.randn
    generator = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        generator.manual_seed(int(seed))
        rows.append(draw(n, generator=generator))
    noise = torch.stack(rows)
    if torch.device(device).type == "cuda":
        noise = noise.pin_memory()  # a copy from pageable memory could wait for the device
    return noise.to(device, non_blocking=True)


@contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and NumPy's global RNG for a block, then restore both.

    For library code that draws from those globals (timm's RandAugment, random erasing and
    Mixup), so its draws become a function of ``seed`` without disturbing anyone else's stream.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
