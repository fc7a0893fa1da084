"""The cheap, fixed probe of an encoder: closed-form ridge on frozen embeddings of held-out data.

How well a linear map of an encoder's embeddings predicts what it never trained on is the
measure of quality the demo and the studies share. The probe set is a data set the encoder
never saw (other episodes, another generation seed). Embeddings are computed once, without
augmentation. By default the probe reads every patch token of the encoder (``readout: tokens``):
a LunarLander lander fills about one patch, and only a readout that keeps each token can say
where it is (tokens averaged over 2 x 2 cells, or raw pixels through a linear map, cannot). The
set is cut into folds by group (LunarLander: whole episodes, so near-identical neighbouring
frames never straddle a split); ridge regression is solved in closed form for every penalty of a
grid from one eigendecomposition (of the samples' Gram matrix when there are more features than
samples: 64 tokens x 192 features for a few thousand frames); the penalty is chosen per target by how well it
predicts the other folds, and the probe then predicts the held-out fold. Every sample is
predicted once by a probe that never saw its episode: the R² of those predictions, per target. The same
probe runs on raw pixels and on the encoder at its random initialisation, so a gain from
pretraining shows as a difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from launcher.data import DataConfig, label_names, motion_labels, open_dataset, probe_subset, sample_groups
from launcher.data.transforms import build_transform
from launcher.embeddings import Encode, embed_dataset
from launcher.methods.vit import grid_pool, patchify, position_moments
from launcher.scores import r2_score

RIDGE_PENALTIES = tuple(10.0**k for k in range(-2, 7))
READOUTS = ("moments", "tokens", "cells", "embed")
PIXEL_GRID = 8  # the raw-pixel baseline is read as this many patches a side


@dataclass
class ProbeConfig:
    """The probe set and what is predicted from it."""

    data: DataConfig = field(default_factory=DataConfig)  # frames the encoder never trained on
    targets: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)  # label columns (LunarLander: its 8 state values)
    # The columns of the headline mean: what one frame shows (LunarLander: x, y, angle). A
    # velocity cannot be read from a single frame by any encoder; it is reported apart.
    headline: tuple[int, ...] = (0, 1, 4)
    # What the ridge reads. "moments": every patch token, averaged plain and weighted by its
    # column and by its row (3 x the token width): one detector shared by every position, so a
    # small object's presence, column and row are linear in it. "tokens": every patch token as
    # its own features (kernel ridge; it needs many more episodes than features to generalise).
    # "cells": the tokens averaged over grid x grid cells. "embed": the method's embed().
    readout: str = "moments"
    grid: int = 2  # the cells of readout "cells"
    pixels: int = 32  # the raw-pixel baseline: the image resized to pixels x pixels
    num_folds: int = 5  # cross-validation over groups (episodes): every sample is scored once, held out
    on_screen_only: bool = True  # the data set's probe subset (LunarLander: frames whose lander is on screen)
    num_samples: int = 0  # at most this many samples, evenly spaced over the set (0: all)
    # Read the patch tokens after the encoder's first `depth` blocks (normalised by its final norm),
    # an inner layer; null: after every block, the encoder's output.
    depth: int | None = None

    def __post_init__(self) -> None:
        if not self.targets or not set(self.headline) <= set(self.targets):
            raise ValueError("probe.targets must list label columns and probe.headline a subset of them")
        if self.num_folds < 3:
            raise ValueError("probe.num_folds must be >= 3 (one held out, the penalty chosen on the others)")
        if self.readout not in READOUTS:
            raise ValueError(f"probe.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"probe.depth must be >= 1 (blocks), or null for the encoder's output; got {self.depth}")
        if self.grid < 1 or self.pixels % PIXEL_GRID or self.pixels <= 0 or self.num_samples < 0:
            raise ValueError(
                f"probe.grid must be >= 1, probe.pixels a positive multiple of {PIXEL_GRID}, probe.num_samples >= 0"
            )

    def describe_readout(self) -> str:
        """How the probe reads an encoder, in words."""
        return {
            "moments": "every patch token, averaged and weighted by its column and row",
            "tokens": "every patch token",
            "cells": f"patch tokens averaged over {self.grid}x{self.grid} cells",
            "embed": "the method's embedding",
        }[self.readout] + ("" if self.depth is None else f", after block {self.depth}")


@dataclass
class ProbeScore:
    """Held-out R² per target column of one encoder."""

    r2: dict[int, float]
    headline: tuple[int, ...]

    @property
    def mean(self) -> float:
        """The headline: mean test R² over the headline columns."""
        return float(np.mean([self.r2[t] for t in self.headline]))

    def to_dict(self, names: dict[int, str]) -> dict[str, float]:
        return {"mean": self.mean, **{names[t]: v for t, v in self.r2.items()}}


def episode_folds(groups: np.ndarray, num_folds: int) -> list[np.ndarray]:
    """Index arrays of ``num_folds`` folds of consecutive groups (LunarLander: episodes); no group is split."""
    ids = np.unique(groups)
    if len(ids) < num_folds:
        raise ValueError(
            f"the probe set has {len(ids)} group(s) (episodes); {num_folds} folds need at least "
            f"{num_folds}: generate more frames"
        )
    return [np.flatnonzero(np.isin(groups, block)) for block in np.array_split(ids, num_folds)]


class FoldRidge:
    """Ridge regression of ``y`` on ``x`` fit on any union of folds, at every penalty of a grid.

    Each fit costs one eigendecomposition, kept for the other fits on the same training folds
    (a nested cross-validation asks for each pair of held-out folds twice). With more features
    than samples (every patch token of a ViT: 64 x 192 features for a few thousand frames) the
    fit is solved in kernel form, from the samples' Gram matrix computed once; otherwise in the
    primal. Features are centred on the training folds and divided by one common scale (their
    root-mean-square spread), not each by its own: a feature that barely varies in training (a
    pixel the lander seldom crosses) would otherwise be blown up wherever it does vary.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, penalties: tuple[float, ...] = RIDGE_PENALTIES) -> None:
        # A shift of every sample by one vector changes no centred fit: centre once on all samples
        # so that the Gram matrix of float32 embeddings (kept in float32: half the time) keeps its
        # precision.
        x = np.asarray(x)
        x = x.astype(np.float32 if x.dtype == np.float32 else np.float64, copy=False)
        x = x - x.mean(0, dtype=np.float64).astype(x.dtype)
        self.kernel = x.shape[1] > x.shape[0]
        self.x = x.astype(np.float64) if not self.kernel else None
        self.gram = (x @ x.T).astype(np.float64) if self.kernel else None
        self.num_features = x.shape[1]
        self.y = np.asarray(y, dtype=np.float64)
        self.penalties = penalties
        self._fits: dict[tuple[int, ...], tuple] = {}

    def predict(self, train: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        """Per penalty, predictions for samples ``rows`` of ridge fit on samples ``train``."""
        key = tuple(train.tolist())
        if key not in self._fits:
            self._fits[key] = self._fit(train)
        eigenvalues, projected, bias, mapping = self._fits[key]
        mapped = mapping(rows)
        return [mapped @ (projected / (eigenvalues + penalty)[:, None]) + bias for penalty in self.penalties]

    def _fit(self, train: np.ndarray) -> tuple:
        bias = self.y[train].mean(0)
        centred = self.y[train] - bias
        if self.kernel:
            block = self.gram[np.ix_(train, train)]
            means, total = block.mean(1), block.mean()
            block = block - means[:, None] - means[None, :] + total  # Gram of features centred on ``train``
            scale2 = float(np.trace(block)) / (len(train) * self.num_features) or 1.0
            eigenvalues, vectors = np.linalg.eigh(block / scale2)
            projected = vectors.T @ centred

            def mapping(rows: np.ndarray) -> np.ndarray:
                cross = self.gram[np.ix_(rows, train)]
                cross = cross - cross.mean(1, keepdims=True) - means[None, :] + total
                return (cross / scale2) @ vectors

        else:
            a = self.x[train]
            mean = a.mean(0)
            scale = float(np.sqrt(((a - mean) ** 2).mean())) or 1.0
            a = (a - mean) / scale
            eigenvalues, vectors = np.linalg.eigh(a.T @ a)
            projected = vectors.T @ (a.T @ centred)

            def mapping(rows: np.ndarray) -> np.ndarray:
                return ((self.x[rows] - mean) / scale) @ vectors

        return np.clip(eigenvalues, 0.0, None), projected, bias, mapping

    def choose_penalties(self, folds: list[np.ndarray]) -> np.ndarray:
        """Per column of ``y``, the penalty whose predictions of each fold, fit on the others, score best.

        Each column gets its own: a penalty that suits a signal would overfit a column the
        features cannot predict, which would then score far below 0 instead of about 0.
        """
        per_fold = [self.predict(np.concatenate(folds[:k] + folds[k + 1 :]), fold) for k, fold in enumerate(folds)]
        targets = self.y[np.concatenate(folds)]
        scores = np.stack(
            [r2_score(targets, np.concatenate([f[p] for f in per_fold])) for p in range(len(self.penalties))]
        )
        best = np.nanargmax(np.nan_to_num(scores, nan=-np.inf), axis=0)
        return np.array([self.penalties[i] for i in best])

    def predict_with(self, train: np.ndarray, rows: np.ndarray, penalties: np.ndarray) -> np.ndarray:
        """Predictions for ``rows`` of ridge fit on ``train``, each column of ``y`` with its own penalty."""
        fits = self.predict(train, rows)
        index = {p: i for i, p in enumerate(self.penalties)}
        return np.stack([fits[index[p]][:, c] for c, p in enumerate(penalties.tolist())], axis=1)


def moments_of(tokens: torch.Tensor) -> torch.Tensor:
    """``position_moments`` of a whole square grid of patch tokens ``[B, N, D]``."""
    return position_moments(tokens, round(tokens.shape[1] ** 0.5))


def cross_validated_probe(x: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """R² per column of ``y`` of every sample predicted by a probe that never saw its fold.

    Nested: for each held-out fold the penalties are chosen on the other folds (each predicted
    by the remaining ones), then ridge fit on all the other folds predicts the held-out one.
    Scoring every sample rather than one held-out fifth keeps the verdict from hanging on which
    few episodes were held out; choosing the penalty on several folds keeps it from hanging on
    one validation split.
    """
    ridge = FoldRidge(x, y)
    predictions = []
    for k, test in enumerate(folds):
        inner = folds[:k] + folds[k + 1 :]
        predictions.append(ridge.predict_with(np.concatenate(inner), test, ridge.choose_penalties(inner)))
    return r2_score(ridge.y[np.concatenate(folds)], np.concatenate(predictions))


def held_out_predictions(x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], test_x: np.ndarray) -> np.ndarray:
    """Predictions for a separate test set ``test_x`` of ridge fit on ``x`` (penalties chosen over its ``folds``)."""
    test = np.arange(len(x), len(x) + len(test_x))
    ridge = FoldRidge(np.concatenate([x, test_x]), np.concatenate([y, np.zeros((len(test_x), *y.shape[1:]))]))
    return ridge.predict_with(np.concatenate(folds), test, ridge.choose_penalties(folds))


def held_out_probe(
    x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], test_x: np.ndarray, test_y: np.ndarray
) -> np.ndarray:
    """R² per column on a separate test set, of ridge fit on ``x`` (penalties chosen over its ``folds``)."""
    return r2_score(np.asarray(test_y, dtype=np.float64), held_out_predictions(x, y, folds, test_x))


class ProbeSet:
    """The probe's data, opened once: samples, labels and splits, for any number of encoders."""

    def __init__(self, cfg: ProbeConfig, img_size: int) -> None:
        self.cfg = cfg
        self.dataset = open_dataset(cfg.data, img_size)
        self.transform = build_transform(cfg.data, img_size, train=False)
        name = cfg.data.name
        # on_screen_only is the default, so a data set without that subset reads every sample.
        keep = (
            probe_subset(name, self.dataset, "probe.on_screen_only", required=False)
            if cfg.on_screen_only
            else np.arange(len(self.dataset))
        )
        if cfg.num_samples and len(keep) > cfg.num_samples:
            keep = keep[np.linspace(0, len(keep) - 1, cfg.num_samples).astype(int)]
        self.indices = keep
        self.groups = sample_groups(name, self.dataset)[keep]
        self.folds = episode_folds(self.groups, cfg.num_folds)
        self.labels: np.ndarray | None = None
        self.names = target_names(name, cfg.targets)

    def encoder(self, model: torch.nn.Module, tokens: Encode | None = None) -> Encode:
        """How this probe reads ``model``: its patch tokens (``model.patch_tokens``, or ``tokens``), as configured."""
        tokens = tokens or getattr(model, "patch_tokens", None)
        if self.cfg.depth is not None and model is not None:  # an encoder's inner layer (pixels have none)
            all_blocks, depth = tokens, self.cfg.depth
            tokens = lambda images: all_blocks(images, depth=depth)  # noqa: E731
        if self.cfg.readout == "embed":
            return model.embed
        if self.cfg.readout == "tokens":
            return lambda images: tokens(images).flatten(1)
        if self.cfg.readout == "moments":
            return lambda images: moments_of(tokens(images))
        grid = self.cfg.grid

        def cells(images: torch.Tensor) -> torch.Tensor:
            patches = tokens(images)
            return grid_pool(patches, round(patches.shape[1] ** 0.5), grid)

        return cells

    def score(self, encode: Encode, device: torch.device | str = "cpu") -> ProbeScore:
        """Embed every sample once with ``encode`` (eval mode), then the ridge probe."""
        x, labels = embed_dataset(encode, self.dataset, self.transform, self.indices, device)
        self.labels = labels
        return self._score(x, labels)

    def score_pixels(self) -> ProbeScore:
        """The same probe on the raw pixels, resized to ``pixels`` x ``pixels`` and read as an 8 x 8 grid
        of patches (the readout's tokens; ``embed`` reads their mean)."""
        side = self.cfg.pixels

        def patches(images: torch.Tensor) -> torch.Tensor:
            return patchify(F.interpolate(images, size=(side, side), mode="area"), side // PIXEL_GRID)

        if self.cfg.readout == "embed":
            return self.score(lambda images: patches(images).mean(1))
        return self.score(self.encoder(None, patches))

    def _score(self, x: np.ndarray, labels: np.ndarray) -> ProbeScore:
        y = labels.reshape(len(labels), -1)[:, list(self.cfg.targets)]
        r2 = cross_validated_probe(x, y, self.folds)
        return ProbeScore(dict(zip(self.cfg.targets, r2.tolist())), self.cfg.headline)


def target_names(dataset: str, targets: tuple[int, ...]) -> dict[int, str]:
    """Readable names of label columns: the data set's label names, else the column numbers."""
    fields = label_names(dataset)
    return {t: fields[t] if t < len(fields) else str(t) for t in targets}


def describe(scores: dict[str, ProbeScore], names: dict[int, str], headline: tuple[int, ...], dataset: str) -> str:
    """A table of test R², one row per encoder (or baseline), one column per target, then the mean.

    The targets one frame shows come first; rates of change, which no single frame shows (the
    ``motion_labels`` of data set ``dataset``), come after a bar: an encoder of one frame can read
    them only from cues such as the engine's flame.
    """
    targets = list(next(iter(scores.values())).r2)
    motion = set(motion_labels(dataset))
    columns = [t for t in targets if names[t] not in motion] + ["|"] + [t for t in targets if names[t] in motion]
    if columns[-1] == "|":
        columns.pop()
    width = max(len(label) for label in scores) + 2
    cell = {t: max(8, len(names[t])) + 2 for t in targets}  # every name fits with two spaces before it
    mean_title = "mean of " + ",".join(names[t] for t in headline)

    def row(label: str, cells: dict) -> str:
        return f"  {label:<{width}}" + "".join("  |" if t == "|" else cells[t] for t in columns)

    rows = [row("", {t: f"{names[t]:>{cell[t]}}" for t in targets}) + f"  {mean_title}"]
    for label, score in scores.items():
        values = {t: f"{score.r2[t]:>{cell[t]}.3f}" for t in targets}
        rows.append(row(label, values) + f"{score.mean:>{len(mean_title) + 2}.3f}")
    return "\n".join(rows)


Scorer = Callable[[Encode], ProbeScore]
