"""data.decode reduced and device: the crops and flips of the tensor path, its pixels within a stated
tolerance, and files that are not plain JPEGs decoded elsewhere or replaced, never fatal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launcher.bench.data import make_jpeg_folder
from launcher.data import DataConfig, open_dataset
from launcher.data.decode import DeviceDecoder, dct_reduction
from launcher.data.sampling import SeededDataset, collate
from launcher.data.transforms import build_device_stage, build_transform

CPU = torch.device("cpu")


def images(root: Path, img_size: int, device: torch.device = CPU, **data) -> dict[str, callable]:
    """For each data.decode: keys -> the batch of images it gives (the device path's both halves)."""

    def path(decode: str):
        cfg = DataConfig(name="imagefolder", root=str(root), augment="mae", decode=decode, **data)
        dataset = SeededDataset(open_dataset(cfg, img_size), build_transform(cfg, img_size), seed=0)
        stage = build_device_stage(cfg, img_size)

        def batch(keys: list[tuple[int, int]]) -> dict:
            out = collate([dataset[k] for k in keys])
            return stage(out, device) if stage else out

        return batch

    return {decode: path(decode) for decode in ("full", "reduced", "device")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six ImageNet-shaped textured JPEGs (500 x 375): at 64 px most crops decode at 1/2 or 1/4."""
    return make_jpeg_folder(tmp_path_factory.mktemp("photos"), 6)


def test_dct_reduction_keeps_the_crop_at_least_the_output_size() -> None:
    assert [dct_reduction(side, 64) for side in (63, 64, 127, 128, 255, 256, 511, 512, 4000)] == [
        1,
        1,
        1,
        2,
        2,
        4,
        4,
        8,
        8,
    ]


def test_every_path_draws_the_crops_and_flips_of_the_tensor_path(photos: Path) -> None:
    # Same key, same crop box and flip. On the CPU the device path runs torchvision's own decoder
    # and resize: the tensor path's pixels exactly. The reduced path differs by Pillow's 8-bit
    # rounding and, where the DCT was scaled, by libjpeg's reduced IDCT: a mean error under 0.02
    # (normalised units; one 8-bit level is about 0.017), while the other flip differs by 0.5 or more.
    keys = [(i, epoch) for i in range(6) for epoch in range(4)]
    paths = images(photos, 64)
    full = paths["full"](keys)["image"]
    assert torch.equal(paths["device"](keys)["image"], full)
    reduced = paths["reduced"](keys)["image"]
    for a, b, key in zip(full, reduced, keys):
        assert (a - b).abs().mean() < 0.02 < 0.5 < (a - b.flip(-1)).abs().mean(), key


def test_where_the_dct_is_not_scaled_the_reduced_path_gives_the_tensor_paths_pixels(photos: Path) -> None:
    keys = [(i, epoch) for i in range(6) for epoch in range(2)]
    paths = images(photos, 224)  # no crop of a 375 px high image reaches 448 px
    assert torch.equal(paths["reduced"](keys)["image"], paths["full"](keys)["image"])


def test_the_reduced_paths_worker_hands_uint8_crops_and_the_device_stage_normalises_them(photos: Path) -> None:
    # A quarter of the floats' bytes to collate and pass between processes; the floats are the
    # tensor path's own once DeviceNormalize has run, whoever decoded the file.
    cfg = DataConfig(name="imagefolder", root=str(photos), augment="mae", decode="reduced")
    dataset = SeededDataset(open_dataset(cfg, 224), build_transform(cfg, 224), seed=0)
    batch = collate([dataset[(i, 0)] for i in range(6)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, 224, 224)
    out = build_device_stage(cfg, 224)(batch, CPU)["image"]
    full = images(photos, 224)["full"]([(i, 0) for i in range(6)])["image"]
    assert out.dtype == torch.float32 and torch.equal(out, full)


def test_plain_jpegs_are_decoded_by_simplejpeg_to_pillows_pixels(photos: Path, monkeypatch) -> None:
    import simplejpeg

    from launcher.data import EncodedImage
    from launcher.data.decode import decode_rgb, open_header

    calls = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or decode(*a, **k))
    for path in sorted(photos.glob("*/*.JPEG")):
        encoded = EncodedImage(path.read_bytes(), str(path))
        with Image.open(path) as image:
            assert np.array_equal(decode_rgb(open_header(encoded), encoded), np.asarray(image.convert("RGB")))
    assert len(calls) == 6


def test_the_reduced_path_decodes_fewer_pixels_when_the_crop_allows(photos: Path, monkeypatch) -> None:
    scales = []
    draft = Image.Image.draft

    def spy(self, mode, size):
        scales.append(self.width // size[0])
        return draft(self, mode, size)

    monkeypatch.setattr("PIL.JpegImagePlugin.JpegImageFile.draft", spy)
    images(photos, 64)["reduced"]([(i, 0) for i in range(6)])
    assert scales and set(scales) <= {2, 4, 8}


def spoiled(root: Path) -> Path:
    """An image folder of JPEGs with a PNG, a CMYK JPEG, a greyscale JPEG, a truncated JPEG and a text file."""
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.jpg")
    pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "c0" / "png.png")
    Image.fromarray(pixels).convert("CMYK").save(root / "c0" / "cmyk.jpg")
    Image.fromarray(pixels).convert("L").save(root / "c1" / "grey.jpg")
    truncated = root / "c1" / "truncated.jpg"
    Image.fromarray(pixels).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "c1" / "text.jpg").write_text("not an image")
    return root


def test_pngs_cmyk_and_grey_files_give_the_tensor_paths_images_and_bad_ones_are_replaced(tmp_path: Path) -> None:
    root = spoiled(tmp_path / "images")
    paths = images(root, 32)
    keys = [(i, epoch) for i in range(13) for epoch in range(2)]
    full, device, reduced = (paths[decode](keys) for decode in ("full", "device", "reduced"))
    names = [Path(p).name for p, _ in open_dataset(DataConfig(name="imagefolder", root=str(root)), 32).samples]
    for batch in (device, reduced):
        assert torch.equal(batch["bad"], full["bad"]) and torch.equal(batch["label"], full["label"])
    bad = {names[i] for (i, _), count in zip(keys, full["bad"].tolist()) if count}
    assert bad == {"truncated.jpg", "text.jpg"}
    # Decoded by Pillow on the worker (PNG, CMYK, truncated) or by torchvision (grey), then cropped
    # alike: the tensor path's pixels, but for the CMYK conversion, which libraries do differently.
    same = [k for k, key in enumerate(keys) if names[key[0]] != "cmyk.jpg"]
    assert torch.equal(device["image"][same], full["image"][same])
    assert (device["image"] - full["image"]).abs().mean() < 0.02
    assert (reduced["image"] - full["image"]).abs().mean() < 0.1  # Pillow's resize of pure noise, as test_sampling


def test_a_jpeg_the_device_cannot_decode_is_replaced_by_the_next_in_the_batch_and_counted(photos: Path) -> None:
    cfg = DataConfig(name="imagefolder", root=str(photos), augment="mae", decode="device")
    dataset = SeededDataset(open_dataset(cfg, 32), build_transform(cfg, 32), seed=0)
    samples = [dataset[(i, 0)] for i in range(3)]
    # A sound header and end marker around a body the decoder rejects.
    samples[1]["encoded"] = torch.frombuffer(
        bytearray(b"\xff\xd8\xff\xdb" + b"\x00" * 64 + b"\xff\xd9"), dtype=torch.uint8
    )
    batch = DeviceDecoder(32, cfg.mean, cfg.std)(collate(samples), CPU)
    assert batch["bad"].tolist() == [0, 1, 0]
    assert torch.equal(batch["image"][1], batch["image"][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nvJPEG and the resize on the GPU")
def test_decoding_on_cuda_gives_the_cpu_paths_images(photos: Path) -> None:
    # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's in the last bits: within 2 8-bit levels on average.
    keys = [(i, epoch) for i in range(6) for epoch in range(2)]
    cpu = images(photos, 224)["full"](keys)["image"]
    cuda = images(photos, 224, torch.device("cuda"))["device"](keys)["image"]
    assert cuda.device.type == "cuda" and cuda.shape == cpu.shape
    assert (cuda.cpu() - cpu).abs().mean() < 0.04


def test_decode_needs_image_files_and_the_mae_crop() -> None:
    with pytest.raises(ValueError, match="data.decode=device reads image files"):
        DataConfig(name="stl10", decode="device")
    with pytest.raises(ValueError, match="data.augment=randaug needs data.decode=full"):
        DataConfig(name="imagefolder", decode="reduced", augment="randaug")
