"""Can the probe see? (``launch study probe-check``): the readout checked against a known answer.

A probe that scores raw pixels and every encoder alike near zero measures nothing. This check
runs the demo's probe (``experiments/demo/local.yaml``: its probe set, folds and readout) on
inputs whose answer is known, next to one another:

- the encoder at its random initialisation, through each readout (``moments``, the demo's:
  every patch token averaged plain and weighted by its column and row; ``tokens``: every patch
  token as its own features; ``cells``: tokens averaged over 2 x 2 cells);
- the raw pixels, through the same ridge: every pixel, and the patches of pixels as tokens
  through the ``moments`` readout;
- one hand-made linear function of the pixels: the blue-minus-green "mass" of each column times
  the column's offset from the centre, summed. The lander is the only blue-violet thing on the
  screen, so this single number is close to its x; the probe fits it with one weight.

If the one-number readout scores high and a ridge on the pixels scores near zero, a linear
readout of x exists and the probe fails to find it from the samples it has: the fault is the
instrument's (its readout, or its sample of episodes), not the features'.
"""

from __future__ import annotations

import dataclasses
from typing import TextIO

import numpy as np
import torch

from launcher.probe import ProbeConfig, ProbeScore, ProbeSet, describe


def column_moment(images: torch.Tensor) -> torch.Tensor:
    """Per image, sum over pixels of (blue - green) x the pixel column's offset from the centre: ``[B, 1]``."""
    violet = (images[:, 2] - images[:, 1]).clamp(min=0)  # the lander; black sky, white ground and yellow flags give 0
    offset = torch.arange(images.shape[-1], dtype=images.dtype) - (images.shape[-1] - 1) / 2
    return (violet * offset).sum(dim=(1, 2)).unsqueeze(1)


def probe_check(probe_cfg: ProbeConfig, method_cfg, seed: int, out: TextIO) -> dict[str, ProbeScore]:
    """The demo's probe on the random-init encoder, on raw pixels and on the one-number readout of x."""
    from launcher.methods import build_method

    unnormalised = dataclasses.replace(probe_cfg.data, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    probe = ProbeSet(probe_cfg, method_cfg.img_size)
    other = {
        readout: ProbeSet(dataclasses.replace(probe_cfg, readout=readout, grid=2), method_cfg.img_size)
        for readout in ("moments", "tokens", "cells")
    }
    raw = ProbeSet(dataclasses.replace(probe_cfg, data=unnormalised), method_cfg.img_size)
    torch.manual_seed(seed)
    encoder = build_method(method_cfg).eval()
    episodes = len(np.unique(probe.groups))
    out.write(f"probe set {probe_cfg.data.root}: {len(probe.indices)} frames of {episodes} episodes\n")
    scores = {
        f"random init, {other[r].cfg.describe_readout()}": other[r].score(other[r].encoder(encoder))
        for r in ("moments", "tokens", "cells")
    }
    side = f"{probe_cfg.pixels}x{probe_cfg.pixels}"
    scores[f"raw pixels ({side}), every pixel"] = other["tokens"].score_pixels()
    scores[f"raw pixels ({side}) as 8x8 patches, averaged and weighted"] = other["moments"].score_pixels()
    scores["one number: violet column moment"] = raw.score(column_moment)
    out.write(describe(scores, probe.names, probe_cfg.headline, probe_cfg.data.name) + "\n")
    return scores
