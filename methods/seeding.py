"""Random draws that are a function of per-sample seeds.

Each sample of a batch carries its own seed (``batch["seed"]``, derived by the data pipeline
from the run's seed, the epoch and the sample index), so a sample's masks or noise do not
depend on how a batch is split over processes, and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def per_sample_noise(seeds: Tensor, n: int, device: torch.device | str,
                     distribution: Literal["uniform", "normal"] = "uniform") -> Tensor:
    """Noise ``[B, n]`` whose row ``i`` depends only on ``seeds[i]``: U[0, 1) or N(0, 1)."""
    draw = torch.rand if distribution == "uniform" else torch.randn
    generator = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        generator.manual_seed(int(seed))
        rows.append(draw(n, generator=generator))
    return torch.stack(rows).to(device, non_blocking=True)
