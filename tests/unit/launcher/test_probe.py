"""The ridge probe: a linear map is recovered, noise is not."""

from __future__ import annotations

import numpy as np

from launcher.probe import ridge_probe


def test_ridge_probe_recovers_a_linear_map_and_rejects_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20))
    w = rng.normal(size=(20, 2))
    y = x @ w + 0.01 * rng.normal(size=(600, 2))
    r2 = ridge_probe(x[:500], y[:500], x[500:], y[500:])
    assert r2.shape == (2,) and (r2 > 0.99).all()
    noise = rng.normal(size=(600, 2))
    assert (ridge_probe(x[:500], noise[:500], x[500:], noise[500:]) < 0.1).all()
