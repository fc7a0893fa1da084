"""``launch bench data``: the generated JPEGs are ImageNet-shaped, and every path is reported."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from launcher.bench.data import make_jpeg_folder
from tests.helpers import launch


def test_the_generated_folder_holds_imagenet_shaped_jpegs(tmp_path: Path) -> None:
    root = make_jpeg_folder(tmp_path / "jpegs", 4)
    files = sorted(root.glob("*/*.JPEG"))
    assert len(files) == 4 and {p.parent.name for p in files} == {"class_0", "class_1"}
    with Image.open(files[0]) as image:
        assert (image.format, image.size) == ("JPEG", (500, 375))
    assert all(p.stat().st_size > 20_000 for p in files)  # textured, not flat colour


def test_bench_data_prints_every_path_and_the_workers_they_need(tmp_path: Path, capsys) -> None:
    args = (
        f"bench data --root {tmp_path / 'jpegs'} --images 4 --rounds 1 --img-size 64 --step-rate 1000,5000 "
        f"--max-side 128 --startup-samples 3000"
    )
    assert launch(args) == 0
    out = capsys.readouterr().out
    lines = {
        name: (int(rate), float(ratio))
        for name, rate, ratio in re.findall(r"^path (\S+): (\d+) img/s per worker \((\d+\.\d+) x tensor\)", out, re.M)
    }
    paths = ["tensor", "pillow", "reduced", "device-cpu", "shards-reduced", "shards-128-reduced", "decode-only-pillow"]
    assert set(paths) <= set(lines) and lines["tensor"] == (lines["tensor"][0], 1.0)
    main = re.findall(r"^main process of (\S+): \d+ img/s of (\w+)", out, re.M)
    assert main == [("reduced", "DeviceNormalize"), ("device-cpu", "DeviceDecoder")] + [
        (name, "DeviceNormalize") for name in ("shards-reduced", "shards-128-reduced")
    ]
    assert "loader workers (one core each)" in out and "5000" in out
    startup = re.findall(r"^start-up (\S+): \d+\.\d s to the first batch of (\d+) samples", out, re.MULTILINE)
    assert startup == [("shards", "3000"), ("imagefolder", "3000")]
