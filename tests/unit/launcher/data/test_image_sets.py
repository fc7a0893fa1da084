"""Image folders, STL-10 binaries and SVHN .mat files, read from files in their real formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from launcher.data import DataConfig, open_dataset
from launcher.data.image_sets import STL10, SVHN
from launcher.errors import DataError
from tests.helpers import write_stl10


def test_imagefolder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        open_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "missing")), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one sub-directory per class"):
        open_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "empty")), 32)
    with pytest.raises(DataError, match="data.root is not set"):
        open_dataset(DataConfig(name="imagefolder"), 32)


def test_imagefolder_labels(image_folder: Path) -> None:
    base = open_dataset(DataConfig(name="imagefolder", root=str(image_folder)), 32)
    assert len(base) == 36
    labels = sorted({int(base[i][1]) for i in range(len(base))})
    assert labels == [0, 1, 2]


def test_stl10_reads_the_column_major_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    images[0, :, :, 0] = np.arange(96)[:, None]  # red grows down the rows
    labels = np.array([0, 3, 9, 1, 2])
    write_stl10(tmp_path / "stl10_binary", "train", images, labels)
    write_stl10(tmp_path / "stl10_binary", "unlabeled", images[:3], None)
    train = STL10(tmp_path, "train")
    assert len(train) == 5
    assert (train.image(0)[:, 7, 0] == np.arange(96)).all()
    for i in range(5):
        assert np.array_equal(train.image(i), images[i]) and train.label(i) == labels[i]
    unlabeled = open_dataset(DataConfig(name="stl10", root=str(tmp_path), split="unlabeled"), 96)
    image, label = unlabeled[2]
    assert np.array_equal(np.asarray(image), images[2]) and int(label) == -1


def test_stl10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_X.bin is missing"):
        STL10(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'extra'"):
        STL10(tmp_path, "extra")
    (tmp_path / "train_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="not a whole number"):
        STL10(tmp_path, "train")


@pytest.mark.parametrize("compressed", [True, False])
def test_svhn_mat_files_convert_and_wrap_pad(tmp_path: Path, compressed: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)  # MATLAB's H x W x C x N
    y = np.array([[10], [1], [2], [3], [4], [5], [9]], dtype=np.float64)  # 10 is the digit 0
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y}, do_compression=compressed)
    svhn = SVHN(tmp_path, "train")
    assert len(svhn) == 7 and (tmp_path / "train_32x32.X.npy").is_file()
    for i in range(7):
        assert np.array_equal(svhn.image(i), x[:, :, :, i])
    assert [svhn.label(i) for i in range(7)] == [0, 1, 2, 3, 4, 5, 9]
    padded = open_dataset(DataConfig(name="svhn", root=str(tmp_path)), 64)
    image, label = padded[3]
    tile = np.asarray(image)
    assert tile.shape == (64, 64, 3) and int(label) == 3
    for r, c in ((0, 0), (0, 32), (32, 0), (32, 32)):  # the digit tiled 2 x 2
        assert np.array_equal(tile[r : r + 32, c : c + 32], x[:, :, :, 3])


def test_svhn_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_32x32.mat is missing"):
        SVHN(tmp_path, "train")
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(DataError, match="not a little-endian MATLAB 5"):
        SVHN(tmp_path, "test")
    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DataError, match="not 32x32x3xN uint8"):
        SVHN(tmp_path, "extra")
    assert not list(tmp_path.glob(".*partial*"))


def test_a_fifo_named_like_an_image_is_skipped_and_reported(image_folder: Path, capsys, caplog) -> None:
    from tests.helpers import launch

    os.mkfifo(image_folder / "n00000001" / "pipe.jpg")  # reading it would block for ever
    base = open_dataset(DataConfig(name="imagefolder", root=str(image_folder)), 32)
    assert len(base) == 36 and all("pipe" not in path for path, _ in base.samples)
    assert "pipe.jpg: skipped (not a regular file" in caplog.text
    assert launch("data check", image_folder) == 2
    out = capsys.readouterr().out
    assert "pipe.jpg: not a regular file" in out and "1 of 37 images" in out


def test_a_directory_link_back_into_the_tree_is_not_followed(image_folder: Path, capsys, caplog) -> None:
    from tests.helpers import launch

    (image_folder / "n00000000" / "up").symlink_to("..")  # once listed every image again, 40 levels deep
    (image_folder / "n00000001" / "self").symlink_to(".")
    base = open_dataset(DataConfig(name="imagefolder", root=str(image_folder)), 32)
    assert len(base) == 36
    assert [c for _, c in base.samples] == [0] * 12 + [1] * 12 + [2] * 12
    assert "up: skipped (a directory link into the data set or above it" in caplog.text
    assert launch("data check", image_folder) == 0
    assert "all 36 images" in capsys.readouterr().out


def test_a_class_folder_outside_the_tree_is_followed(image_folder: Path, tmp_path: Path) -> None:
    from tests.helpers import make_image_folder

    make_image_folder(tmp_path / "elsewhere", num_classes=1, per_class=2)
    (image_folder / "n00000009").symlink_to(tmp_path / "elsewhere" / "n00000000")
    base = open_dataset(DataConfig(name="imagefolder", root=str(image_folder)), 32)
    assert len(base) == 38 and base.classes[-1] == "n00000009"


def test_an_unreadable_class_folder_is_a_permission_problem(shared_tmp: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import make_image_folder

    root = make_image_folder(shared_tmp / "images")
    for path in (shared_tmp, root, *root.iterdir()):
        path.chmod(0o755)
    (root / "n00000001").chmod(0o000)
    # root reads any folder: run the check as nobody there.
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    code = "import sys; from launcher.cli import main; sys.exit(main(['data', 'check', sys.argv[1]]))"
    proc = subprocess.run([*user, sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot list {root / 'n00000001'}: Permission denied" in proc.stderr and "chmod u+rx" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_16_bit_png_keeps_its_range(tmp_path: Path) -> None:
    from PIL import Image

    from launcher.data.image_sets import read_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = np.asarray(read_image(tmp_path / "deep.png"))
    assert pixels.shape == (64, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_allclose(pixels[..., 0], ramp / 65535 * 255, atol=0.51)  # once 99.6% were 255
