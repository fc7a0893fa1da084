"""The cheap, fixed probe of an encoder: closed-form ridge on frozen embeddings of held-out data.

How well a linear map of an encoder's embeddings predicts what it never trained on is the
measure of quality the demo and the studies share. The probe set is a data set the encoder
never saw (other episodes, another generation seed). Embeddings are computed once, without
augmentation. The set is cut into folds by group (LunarLander: whole episodes, so near-identical
neighbouring frames never straddle a split); ridge regression is solved in closed form for every
penalty of a grid from one eigendecomposition; the penalty is chosen per target by how well it
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

from launcher.data import DataConfig, open_dataset
from launcher.data.lunarlander import on_screen_indices
from launcher.data.transforms import build_transform
from launcher.embeddings import Encode, embed_dataset
from launcher.scores import r2_score

RIDGE_PENALTIES = tuple(10.0**k for k in range(-2, 7))


@dataclass
class ProbeConfig:
    """The probe set and what is predicted from it."""

    data: DataConfig = field(default_factory=DataConfig)  # frames the encoder never trained on
    targets: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)  # label columns (LunarLander: its 8 state values)
    headline: tuple[int, ...] = (0, 1, 2, 3, 4)  # the columns of the headline mean (x, y, vx, vy, angle)
    grid: int = 4  # patch tokens averaged over grid x grid cells (0: the method's embed())
    pixels: int = 32  # the raw-pixel baseline: the image resized to pixels x pixels
    num_folds: int = 5  # cross-validation over groups (episodes): every sample is scored once, held out
    on_screen_only: bool = True  # LunarLander: leave out frames whose lander has left the screen
    num_samples: int = 0  # at most this many samples, evenly spaced over the set (0: all)

    def __post_init__(self) -> None:
        if not self.targets or not set(self.headline) <= set(self.targets):
            raise ValueError("probe.targets must list label columns and probe.headline a subset of them")
        if self.num_folds < 3:
            raise ValueError("probe.num_folds must be >= 3 (one held out, the penalty chosen on the others)")
        if self.grid < 0 or self.pixels <= 0 or self.num_samples < 0:
            raise ValueError("probe.grid and probe.num_samples must be >= 0, probe.pixels > 0")


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


def ridge_predictions(
    train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, penalties: tuple[float, ...]
) -> list[np.ndarray]:
    """Ridge predictions for ``x`` at every penalty, from one eigendecomposition.

    Features are centred on the training set and divided by one common scale (their root-mean-
    square spread), not each by its own: a feature that barely varies in training (a pixel the
    lander seldom crosses) would otherwise be blown up wherever it does vary. With more features
    than samples the dual (kernel) form is solved instead of the primal.
    """
    mean = train_x.mean(0)
    scale = float(np.sqrt(((train_x - mean) ** 2).mean())) or 1.0
    a, b = (train_x - mean) / scale, (x - mean) / scale
    bias = train_y.mean(0)
    centred = train_y - bias
    if a.shape[1] <= a.shape[0]:
        eigenvalues, vectors = np.linalg.eigh(a.T @ a)
        projected, mapped = vectors.T @ (a.T @ centred), b @ vectors
    else:
        eigenvalues, vectors = np.linalg.eigh(a @ a.T)
        projected, mapped = vectors.T @ centred, (b @ a.T) @ vectors
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    return [mapped @ (projected / (eigenvalues + penalty)[:, None]) + bias for penalty in penalties]


def out_of_fold_predictions(
    x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], penalties: tuple[float, ...]
) -> list[np.ndarray]:
    """Per penalty, every sample of ``folds`` predicted by ridge fit on the other folds (in fold order)."""
    per_fold = [
        ridge_predictions(
            x[np.concatenate([f for j, f in enumerate(folds) if j != k])],
            y[np.concatenate([f for j, f in enumerate(folds) if j != k])],
            x[fold],
            penalties,
        )
        for k, fold in enumerate(folds)
    ]
    return [np.concatenate([fold[p] for fold in per_fold]) for p in range(len(penalties))]


def choose_penalties(x: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Per column of ``y``, the penalty whose out-of-fold predictions over ``folds`` score best.

    Each column gets its own: a penalty that suits a signal would overfit a column the features
    cannot predict, which would then score far below 0 instead of about 0.
    """
    targets = y[np.concatenate(folds)]
    scores = np.stack([r2_score(targets, p) for p in out_of_fold_predictions(x, y, folds, RIDGE_PENALTIES)])
    best = np.nanargmax(np.nan_to_num(scores, nan=-np.inf), axis=0)
    return np.array([RIDGE_PENALTIES[i] for i in best])


def predict_with(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, penalties: np.ndarray) -> np.ndarray:
    """Ridge predictions for ``x``, each column of ``train_y`` with its own penalty."""
    options = sorted(set(penalties.tolist()))
    fits = dict(zip(options, ridge_predictions(train_x, train_y, x, tuple(options))))
    return np.stack([fits[penalty][:, column] for column, penalty in enumerate(penalties.tolist())], axis=1)


def cross_validated_probe(x: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """R² per column of ``y`` of every sample predicted by a probe that never saw its fold.

    Nested: for each held-out fold the penalties are chosen on the other folds (each predicted
    by the remaining ones), then ridge fit on all the other folds predicts the held-out one.
    Scoring every sample rather than one held-out fifth keeps the verdict from hanging on which
    few episodes were held out; choosing the penalty on several folds keeps it from hanging on
    one validation split.
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    predictions = []
    for k, test in enumerate(folds):
        inner = [f for j, f in enumerate(folds) if j != k]
        train = np.concatenate(inner)
        predictions.append(predict_with(x[train], y[train], x[test], choose_penalties(x, y, inner)))
    return r2_score(y[np.concatenate(folds)], np.concatenate(predictions))


def held_out_probe(
    x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], test_x: np.ndarray, test_y: np.ndarray
) -> np.ndarray:
    """R² per column on a separate test set, of ridge fit on ``x`` (penalties chosen over its ``folds``)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    fit = np.concatenate(folds)
    prediction = predict_with(x[fit], y[fit], test_x.astype(np.float64), choose_penalties(x, y, folds))
    return r2_score(test_y.astype(np.float64), prediction)


class ProbeSet:
    """The probe's data, opened once: samples, labels and splits, for any number of encoders."""

    def __init__(self, cfg: ProbeConfig, img_size: int) -> None:
        self.cfg = cfg
        self.dataset = open_dataset(cfg.data, img_size)
        self.transform = build_transform(cfg.data, img_size, train=False)
        frames = getattr(self.dataset, "frames", None)  # LunarLander's arrays
        on_screen = cfg.on_screen_only and frames is not None  # the default, harmless on other sets
        keep = on_screen_indices(self.dataset, "probe.on_screen_only") if on_screen else np.arange(len(self.dataset))
        if cfg.num_samples and len(keep) > cfg.num_samples:
            keep = keep[np.linspace(0, len(keep) - 1, cfg.num_samples).astype(int)]
        self.indices = keep
        groups = np.asarray(frames.episodes)[keep] if frames is not None else keep
        self.groups = groups
        self.folds = episode_folds(groups, cfg.num_folds)
        self.labels: np.ndarray | None = None
        self.names = target_names(cfg.data.name, cfg.targets)

    def score(self, encode: Encode, device: torch.device | str = "cpu") -> ProbeScore:
        """Embed every sample once with ``encode`` (eval mode), then the ridge probe."""
        x, labels = embed_dataset(encode, self.dataset, self.transform, self.indices, device)
        self.labels = labels
        return self._score(x, labels)

    def score_pixels(self) -> ProbeScore:
        """The same probe on the raw pixels, resized to ``pixels`` x ``pixels``."""
        side = self.cfg.pixels

        def pixels(images: torch.Tensor) -> torch.Tensor:
            return F.interpolate(images, size=(side, side), mode="area").flatten(1)

        return self.score(pixels)

    def _score(self, x: np.ndarray, labels: np.ndarray) -> ProbeScore:
        y = labels.reshape(len(labels), -1)[:, list(self.cfg.targets)]
        r2 = cross_validated_probe(x, y, self.folds)
        return ProbeScore(dict(zip(self.cfg.targets, r2.tolist())), self.cfg.headline)


def target_names(dataset: str, targets: tuple[int, ...]) -> dict[int, str]:
    """Readable names of label columns: LunarLander's state fields, else the column numbers."""
    from launcher.data.lunarlander import STATE_FIELDS

    fields = STATE_FIELDS if dataset == "lunarlander" else ()
    return {t: fields[t] if t < len(fields) else str(t) for t in targets}


def describe(scores: dict[str, ProbeScore], names: dict[int, str], headline: tuple[int, ...]) -> str:
    """A table of test R², one row per encoder (or baseline), one column per target, then the mean."""
    columns = list(next(iter(scores.values())).r2)
    width = max(len(label) for label in scores) + 2
    cell = {t: max(8, len(names[t])) + 2 for t in columns}  # every name fits with two spaces before it
    mean_title = "mean of " + ",".join(names[t] for t in headline)
    head = f"  {'':<{width}}" + "".join(f"{names[t]:>{cell[t]}}" for t in columns) + f"  {mean_title}"
    rows = [head]
    for label, score in scores.items():
        cells = "".join(f"{score.r2[t]:>{cell[t]}.3f}" for t in columns)
        rows.append(f"  {label:<{width}}{cells}{score.mean:>{len(mean_title) + 2}.3f}")
    return "\n".join(rows)


Scorer = Callable[[Encode], ProbeScore]
