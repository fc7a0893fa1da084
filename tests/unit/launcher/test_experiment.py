"""Experiments: every shipped file loads, the papers' recipes, bad configs name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.experiment import ExperimentConfig, experiment_from_dict, load_experiment
from launcher.shipped import experiments_dir

EXPERIMENTS_DIR = experiments_dir()

# Every experiment a trainer runs; the files of sweeps (tune/), studies (study/) and the demo (demo/)
# are tested below and in tests/unit/launcher/studies/.
EXPERIMENTS = sorted(p for p in EXPERIMENTS_DIR.rglob("*.yaml") if p.parent.name not in ("tune", "study", "demo"))


def test_experiments_exist() -> None:
    names = {p.name for p in EXPERIMENTS}
    assert {"pcae_vit_base.yaml", "mae_vit_base.yaml", "pcae_local.yaml", "mae_local.yaml"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(EXPERIMENTS_DIR)) for p in EXPERIMENTS])
def test_every_experiment_loads_and_validates(path: Path) -> None:
    cfg = load_experiment(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.method.name in (path.stem, path.parent.name) or cfg.method.name in path.stem


def test_finetune_and_linprobe_recipes_are_maes() -> None:
    cfg = load_experiment(EXPERIMENTS_DIR / "finetune" / "vit_base.yaml")
    method, optim, data = cfg.method, cfg.optim, cfg.data
    assert (method.drop_path, method.mixup, method.cutmix, method.label_smoothing, method.pool) == (
        0.1,
        0.8,
        1.0,
        0.1,
        "avg",
    )
    assert (optim.name, optim.blr, optim.layer_decay, optim.weight_decay, optim.warmup_epochs) == (
        "adamw",
        5e-4,
        0.65,
        0.05,
        5,
    )
    assert (data.augment, data.rand_augment, data.reprob) == ("randaug", "rand-m9-mstd0.5-inc1", 0.25)
    assert (cfg.train.num_epochs, cfg.train.global_batch_size) == (100, 1024)
    cfg = load_experiment(EXPERIMENTS_DIR / "linprobe" / "vit_base.yaml")
    method, optim = cfg.method, cfg.optim
    assert (method.pool, method.freeze_encoder, method.head_batchnorm, method.head_init_std) == (
        "cls",
        True,
        True,
        0.01,
    )
    assert (optim.name, optim.blr, optim.weight_decay, optim.warmup_epochs) == ("lars", 0.1, 0.0, 10)
    assert (cfg.train.num_epochs, cfg.train.global_batch_size) == (90, 16384)


def test_vit_base_recipes_are_the_papers() -> None:
    for method in ("pcae", "mae"):
        cfg = load_experiment(EXPERIMENTS_DIR / "pretrain" / f"{method}_vit_base.yaml")
        assert (cfg.method.img_size, cfg.method.patch_size, cfg.method.mask_ratio) == (224, 16, 0.75)
        assert (cfg.method.decoder_dim, cfg.method.decoder_depth) == (512, 8)
        assert cfg.train.global_batch_size == 4096
        assert cfg.optim.blr == 1.5e-4 and cfg.optim.weight_decay == 0.05
        assert cfg.optim.warmup_epochs == 40 and tuple(cfg.optim.betas) == (0.9, 0.95)
    pcae = load_experiment(EXPERIMENTS_DIR / "pretrain" / "pcae_vit_base.yaml")
    assert pcae.method.drop_path == 0.25 and pcae.method.keep_ratio == 0.5


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"method": {"name": "mae"}, "optim": {"lr_typo": 1}}, r"unknown key\(s\) optim\.lr_typo; optim allows: .*blr"),
        ({"method": {"name": "mae"}, "optimizer": {}}, r"unknown section\(s\) \['optimizer'\]"),
        ({"method": {"name": "nope"}}, r"unknown method 'nope'; known methods: .*mae.*pcae"),
        ({"method": {}}, r"method\.name is required"),
        (
            {"method": {"name": "mae"}, "train": {"mixed_precision": "fp8"}},
            r"train\.mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16'",
        ),
        ({"method": {"name": "mae"}, "train": {"global_batch_size": 100, "micro_batch_size": 64}}, r"multiple of"),
        ({"method": {"name": "mae", "img_size": 100}}, r"invalid method: .*"),
        ({"method": {"name": "mae"}, "optim": {"betas": "0.9"}}, r"optim\.betas must be a list"),
    ],
)
def test_bad_configs_name_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(raw)


def test_method_argument_must_match_the_file() -> None:
    with pytest.raises(ConfigError, match="is for method 'pcae' but the command asks for 'mae'"):
        load_experiment(EXPERIMENTS_DIR / "pretrain" / "pcae_vit_base.yaml", method="mae")


def test_the_demo_and_study_files_load() -> None:
    from launcher.demo import load_demo
    from launcher.shipped import find_experiment
    from launcher.studies.compare import load_study

    demo = load_demo()
    assert find_experiment(demo.linprobe).is_file() and demo.probe.data.generate_seed not in (0, 1)
    for path in sorted((EXPERIMENTS_DIR / "study").glob("*.yaml")):
        study = load_study(path)
        assert len(study.seeds) >= 3 and study.fractions[-1] == 1.0


def test_a_method_that_is_not_rgb_is_refused_before_the_run_directory(tmp_path: Path, capsys) -> None:
    from tests.helpers import launch, make_image_folder, tiny_experiment, write_yaml

    experiment = write_yaml(tmp_path / "mae.yaml", tiny_experiment("mae", make_image_folder(tmp_path / "images")))
    assert launch(f"pretrain mae --experiment {experiment} --run-dir {tmp_path / 'run'} method.in_chans=1") == 2
    err = capsys.readouterr().err
    assert "method.in_chans is 1, but every data set is read as RGB images (3 channels" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["pcae", "finetune", "linprobe", "ae_iipw"])
@pytest.mark.parametrize("in_chans", [1, 4])
def test_every_method_reads_three_channels(tmp_path: Path, method: str, in_chans: int) -> None:
    from tests.helpers import tiny_experiment

    raw = tiny_experiment(method, tmp_path)
    raw["method"]["in_chans"] = in_chans
    with pytest.raises(ConfigError, match=f"method.in_chans is {in_chans}, but every data set is read as RGB"):
        experiment_from_dict(raw)
