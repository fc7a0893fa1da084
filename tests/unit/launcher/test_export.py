"""``launch export``: a folder timm builds and loads by itself (the README's call, verbatim), and a
``launch finetune`` source."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from launcher.experiment import experiment_from_dict
from launcher.trainer import Trainer
from tests.helpers import REPO, launch, tiny_experiment

ODD_MEAN, ODD_STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]


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
    # Normalised by statistics of its own, unlike any timm default: the export must carry them.
    odd = tiny_experiment("mae", images, train={"num_epochs": 1}, data={"mean": ODD_MEAN, "std": ODD_STD})
    Trainer(experiment_from_dict(odd), tmp / "mae-odd-norm").fit()
    out["mae-odd-norm"] = tmp / "mae-odd-norm"
    out["images"] = images
    return out


def ours(run: Path, which: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    from launcher.methods import build_method

    cfg = experiment_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    model = build_method(cfg.method)
    step = sorted((run / "checkpoints").iterdir())[-1]
    model.load_state_dict(load_file(str(step / "model.safetensors")), strict=False)
    return (model.teacher if which == "teacher" else getattr(model, "student", None) or model.encoder).eval()


def readme_timm_snippet() -> str:
    """The README's Python block that loads an export with timm, as printed there."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [block for block in blocks if "local-dir:" in block]
    assert len(found) == 1, "the README shows one timm call for an export"
    return found[0]


def run_readme_snippet(folder: Path, cwd: Path) -> dict:
    """Run the README's snippet in ``cwd``, its folder name replaced by ``folder`` (relative to ``cwd``)."""
    snippet = readme_timm_snippet()
    name = re.search(r'"local-dir:([^"]+)"', snippet).group(1)
    namespace: dict = {}
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(snippet.replace(f"local-dir:{name}", f"local-dir:{folder}"), "README.md", "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


@pytest.mark.parametrize("method, which", [("pcae", "student"), ("pcae", "teacher"), ("mae", "student")])
def test_the_readme_call_builds_the_exported_encoder_and_gives_our_patch_tokens(
    runs, tmp_path: Path, method: str, which: str
) -> None:
    out = tmp_path / f"{method}-{which}"
    assert launch(f"export {runs[method]} --out {out} --encoder {which}") == 0
    model = run_readme_snippet(out, tmp_path)["model"].eval()
    config = yaml.safe_load((runs[method] / "config.yaml").read_text())
    img = config["method"]["img_size"]
    images = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.forward_features(images)[:, model.num_prefix_tokens :]
        mine = ours(runs[method], which)(images)[:, 1:]
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)


def test_the_readme_snippet_verbatim_builds_exactly_the_architecture_and_data_config(
    runs, tmp_path: Path, capsys
) -> None:
    """The snippet as printed, folder name included: depth, width, heads, patch, image size and the
    run's own mean/std (not timm's defaults for the name), in files the group may read."""
    from launcher.methods.vit import vit_size

    snippet = readme_timm_snippet()
    folder = re.search(r'"local-dir:([^"]+)"', snippet).group(1)
    run = runs["mae-odd-norm"]
    method = yaml.safe_load((run / "config.yaml").read_text())["method"]
    previous = os.umask(0o027)
    try:
        assert launch(f"export {run} --out {tmp_path / folder}") == 0
    finally:
        os.umask(previous)
    assert f'timm.create_model("local-dir:{tmp_path / folder}", pretrained=True, num_classes=0)' in (
        capsys.readouterr().out
    )
    namespace = run_readme_snippet(Path(folder), tmp_path)
    model, data_config = namespace["model"], namespace["data_config"]
    preset = vit_size(method["size"])
    assert len(model.blocks) == preset.depth and model.embed_dim == preset.embed_dim
    assert model.blocks[0].attn.num_heads == preset.num_heads
    assert model.patch_embed.patch_size == (method["patch_size"],) * 2
    assert model.patch_embed.img_size == (method["img_size"],) * 2 and model.num_classes == 0
    assert data_config["input_size"] == (3, method["img_size"], method["img_size"])
    assert data_config["mean"] == pytest.approx(ODD_MEAN) and data_config["std"] == pytest.approx(ODD_STD)
    assert data_config["interpolation"] == "bicubic"
    # Written for others: the umask decides, as for any file this process creates (0600 before).
    assert (tmp_path / folder).stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir()} == {
        "model.safetensors": 0o640,
        "config.json": 0o640,
    }


def test_an_export_that_does_not_fit_its_architecture_fails_loudly(runs, tmp_path: Path) -> None:
    """Loading is strict: a tensor that is missing or of another shape is an error, never left at random."""
    out = tmp_path / "mae"
    assert launch(f"export {runs['mae']} --out {out}") == 0
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["depth"] += 1  # as if the folder described a deeper encoder than its weights
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks\.\d+\."):
        run_readme_snippet(out, tmp_path)


def test_an_exported_encoder_is_a_finetuning_source_like_an_official_mae_file(runs, tmp_path: Path) -> None:
    out = tmp_path / "mae"
    assert launch(f"export {runs['mae']} --out {out}") == 0
    from launcher.sources import resolve_source

    source = resolve_source(out, "finetune")
    assert "method.size=micro" in source.overrides and "method.patch_size=8" in source.overrides
    assert f"method.pretrained={(out / 'model.safetensors').resolve()}" in source.overrides
    from launcher.methods.pretrained import load_pretrained

    assert load_pretrained(out / "model.safetensors").source == "official MAE"


@pytest.mark.parametrize("case", ["exists", "no checkpoint", "not a run", "teacher of mae", "file suffix", "pth"])
def test_bad_exports_exit_2_and_write_nothing(runs, tmp_path: Path, capsys, case: str) -> None:
    out, source, extra = tmp_path / "e", runs["mae"], ""
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
    elif case == "file suffix":
        out = tmp_path / "e.safetensors"
    elif case == "pth":
        out = tmp_path / "e.pth"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert launch(f"export {source} --out {out} {extra}") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_text() == "precious"


def test_an_export_under_a_file_exits_2_and_writes_nothing(runs, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("precious")
    assert launch(f"export {runs['mae']} --out {tmp_path / 'afile' / 'encoder'}") == 2
    err = capsys.readouterr().err
    assert f"cannot write --out {tmp_path / 'afile' / 'encoder'}: {tmp_path / 'afile'} is a file" in err
    assert "Traceback" not in err and [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("out", ["ro/encoder", "ro/new/encoder"])
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
