"""``launch export``: encoders in timm's layout, loaded by timm itself, and back into ``launch finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from launcher.experiment import experiment_from_dict
from launcher.trainer import Trainer
from tests.helpers import launch, tiny_experiment


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny PCAE and a tiny MAE run."""
    from tests.helpers import make_image_folder

    tmp = tmp_path_factory.mktemp("export")
    images = make_image_folder(tmp / "images")
    out = {}
    for method in ("pcae", "mae"):
        cfg = experiment_from_dict(tiny_experiment(method, images, train={"num_epochs": 1}))
        Trainer(cfg, tmp / method).fit()
        out[method] = tmp / method
    out["images"] = images
    return out


def ours(run: Path, which: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    from methods import build_method

    cfg = experiment_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    model = build_method(cfg.method)
    step = sorted((run / "checkpoints").iterdir())[-1]
    model.load_state_dict(load_file(str(step / "model.safetensors")), strict=False)
    return (model.teacher if which == "teacher" else getattr(model, "student", None) or model.encoder).eval()


@pytest.mark.parametrize("method, which", [("pcae", "student"), ("pcae", "teacher"), ("mae", "student")])
def test_timm_loads_the_export_and_gives_our_patch_tokens(runs, tmp_path: Path, method: str, which: str) -> None:
    out = tmp_path / f"{method}-{which}.safetensors"
    assert launch(f"export {runs[method]} --out {out} --encoder {which}") == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(
        meta["timm_model"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(out)},
        **meta["timm_kwargs"],
    ).eval()
    images = torch.randn(3, 3, meta["img_size"], meta["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.forward_features(images)[:, model.num_prefix_tokens :]
        mine = ours(runs[method], which)(images)[:, 1:]
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)


def test_an_exported_encoder_is_a_finetuning_source_like_an_official_mae_file(runs, tmp_path: Path) -> None:
    out = tmp_path / "mae.safetensors"
    assert launch(f"export {runs['mae']} --out {out}") == 0
    from launcher.sources import resolve_source

    source = resolve_source(out, "finetune")
    assert "method.size=micro" in source.overrides and "method.patch_size=8" in source.overrides
    from methods.pretrained import load_pretrained

    assert load_pretrained(out).source == "official MAE"


@pytest.mark.parametrize("case", ["exists", "no checkpoint", "not a run", "teacher of mae", "suffix"])
def test_bad_exports_exit_2_and_write_nothing(runs, tmp_path: Path, capsys, case: str) -> None:
    out, source, extra = tmp_path / "e.safetensors", runs["mae"], ""
    if case == "exists":
        out.write_text("precious")
    elif case == "no checkpoint":
        source = tmp_path / "empty-run"
        source.mkdir()
        (source / "config.yaml").write_text((runs["mae"] / "config.yaml").read_text())
    elif case == "not a run":
        source = tmp_path
    elif case == "teacher of mae":
        extra = "--encoder teacher"
    elif case == "suffix":
        out = tmp_path / "e.pth"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert launch(f"export {source} --out {out} {extra}") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_text() == "precious"


def test_an_export_under_a_file_exits_2_and_writes_nothing(runs, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("precious")
    assert launch(f"export {runs['mae']} --out {tmp_path / 'afile' / 'e.safetensors'}") == 2
    err = capsys.readouterr().err
    assert f"cannot write --out {tmp_path / 'afile' / 'e.safetensors'}: {tmp_path / 'afile'} is a file" in err
    assert "Traceback" not in err and [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("out", ["ro/e.safetensors", "ro/new/e.safetensors"])
def test_an_export_into_a_folder_this_user_cannot_write_exits_2(runs, shared_tmp: Path, out: str) -> None:
    import shutil

    from tests.helpers import launch_as_another_user, readable_by_all

    shutil.copytree(runs["mae"], shared_tmp / "run")
    (shared_tmp / "ro").mkdir()
    readable_by_all(shared_tmp)
    result = launch_as_another_user("export", shared_tmp / "run", "--out", shared_tmp / out)
    assert result.returncode == 2, result.stderr
    assert f"cannot write --out {shared_tmp / out}: {shared_tmp / 'ro'} is not writable by this user" in result.stderr
    assert "Traceback" not in result.stderr and list((shared_tmp / "ro").iterdir()) == []
