"""The evaluation set: which samples are scored, over how many processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data import DataConfig
from launcher.data.lunarlander import LunarLanderFrames
from launcher.data.lunarlander_generate import generate_lunarlander
from launcher.errors import ConfigError
from launcher.evaluate import EvalConfig, build_eval_loader
from tests.helpers import make_image_folder


def scored_labels(cfg: EvalConfig, rank: int, world_size: int) -> np.ndarray:
    return torch.cat([batch["label"] for batch in build_eval_loader(cfg, 64, rank, world_size)]).numpy()


def test_on_screen_only_scores_exactly_the_frames_whose_lander_is_on_screen(tmp_path: Path) -> None:
    root = generate_lunarlander(tmp_path / "ll", num_frames=400, size=64, seed=3, num_workers=1)
    frames = LunarLanderFrames(root)
    data = DataConfig(name="lunarlander", root=str(root), augment="none", num_workers=0)
    on_screen = frames.on_screen_mask()
    assert 0 < on_screen.sum() < len(on_screen)

    every = scored_labels(EvalConfig(data=data, batch_size=64), 0, 1)
    np.testing.assert_array_equal(every, np.asarray(frames.states))
    kept = EvalConfig(data=data, batch_size=64, on_screen_only=True)
    np.testing.assert_array_equal(scored_labels(kept, 0, 1), np.asarray(frames.states)[on_screen])
    shards = np.concatenate([scored_labels(kept, rank, 3) for rank in range(3)])  # each frame once
    assert len(shards) == on_screen.sum()
    np.testing.assert_array_equal(np.unique(shards, axis=0), np.unique(np.asarray(frames.states)[on_screen], axis=0))


def test_on_screen_only_on_images_is_refused(tmp_path: Path) -> None:
    data = DataConfig(name="imagefolder", root=str(make_image_folder(tmp_path / "images")), num_workers=0)
    with pytest.raises(ConfigError, match="eval.on_screen_only is for LunarLander"):
        build_eval_loader(EvalConfig(data=data, on_screen_only=True), 64, 0, 1)


def _finetune(images: Path, eval_root: Path, tmp_path: Path, **method_fields):
    from launcher.experiment import experiment_from_dict
    from launcher.trainer import Trainer
    from tests.helpers import finetune_experiment

    raw = finetune_experiment(images, **method_fields)
    raw["eval"]["data"]["root"] = str(eval_root)
    return Trainer(experiment_from_dict(raw), tmp_path / "run")


def test_class_names_not_positions_label_the_evaluation_set(tmp_path: Path) -> None:
    import shutil

    images = make_image_folder(tmp_path / "train", per_class=4)
    evaluation = make_image_folder(tmp_path / "eval", per_class=2, seed=1)
    shutil.rmtree(evaluation / "n00000000")  # no images of the first class: the others keep labels 1 and 2
    trainer = _finetune(images, evaluation, tmp_path)
    scored = torch.cat([batch["label"] for batch in trainer.eval_loader]).tolist()
    assert sorted(scored) == [1, 1, 2, 2]


def test_an_evaluation_class_the_training_set_lacks_is_refused_before_the_run(tmp_path: Path) -> None:
    from launcher.errors import DataError

    images = make_image_folder(tmp_path / "train", per_class=4)
    evaluation = make_image_folder(tmp_path / "eval", num_classes=4, per_class=2, seed=1)
    with pytest.raises(DataError, match=r"the class folder\(s\) n00000003 are not classes of the training set"):
        _finetune(images, evaluation, tmp_path)
    assert not (tmp_path / "run").exists()


def test_num_classes_must_match_the_class_folders_before_the_run(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "train", per_class=4)
    with pytest.raises(
        ConfigError, match=r"method.num_classes is 2 but the training set has 3 classes .*num_classes=3"
    ):
        _finetune(images, images, tmp_path, num_classes=2)
    assert not (tmp_path / "run").exists()
