"""``launch bench data``: images per second per loader worker of the pretraining input pipeline.

The pipeline measured is the project's own: ``SeededDataset`` over the ``imagefolder`` data set
with MAE's pretraining transform (decode, random resized crop, flip, normalise), one sample at a
time on one thread, as one DataLoader worker runs it. Its ``data.resample`` paths are timed
side by side, round after round, on an ImageFolder of generated JPEGs shaped like ImageNet's
(500x375, quality 90, textured so that they compress like photographs), with decoding alone
beside them: what no resampling path can beat with that decoder. Given the training step rates
of ``launch bench pretrain`` (``--step-rate``), it prints how many workers each path needs to
keep one GPU fed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_SHAPE = (375, 500)  # (height, width): the most common ImageNet-1k training image


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> Path:
    """An ImageFolder (two classes) of ``count`` textured 500x375 JPEGs at quality 90, made once."""
    if len(list(root.glob("*/*.JPEG"))) >= count:
        return root
    rng = np.random.default_rng(seed)
    height, width = IMAGENET_SHAPE
    for i in range(count):
        # Octaves of smooth noise and a little grain: the spectrum of a natural photograph, so
        # the files are the size (and the decode the cost) of real ones, not of flat colour.
        image = np.zeros((height, width, 3))
        for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25), (250, 0.12)):
            small = rng.random((max(2, cells * 3 // 4), cells, 3))
            layer = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
            image += weight * np.asarray(layer, dtype=np.float64)
        image = (image - image.min()) / np.ptp(image) * 255 + rng.normal(0, 4, image.shape)
        path = root / f"class_{i % 2}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def _decoders() -> dict[str, object]:
    """Decode-only contenders: Pillow (what both paths use), and simplejpeg when it is installed."""
    from launcher.data.image_sets import read_image

    decoders: dict[str, object] = {"decode only (Pillow)": read_image}
    try:
        import simplejpeg

        decoders["decode only (simplejpeg)"] = lambda path: simplejpeg.decode_jpeg(Path(path).read_bytes())
    except ImportError:
        pass
    return decoders


def bench_data(args: argparse.Namespace) -> int:
    from launcher.bench.compute import describe_machine
    from launcher.data import DataConfig, open_dataset
    from launcher.data.sampling import SeededDataset
    from launcher.data.transforms import build_transform

    torch.set_num_threads(1)  # one loader worker is one process on one core
    root = make_jpeg_folder(Path(args.root), args.images)
    sizes = [p.stat().st_size for p in sorted(root.glob("*/*.JPEG"))[: args.images]]
    print(describe_machine(torch.device("cpu")))
    print(
        f"{len(sizes)} JPEGs of {IMAGENET_SHAPE[1]}x{IMAGENET_SHAPE[0]} at quality 90, "
        f"{np.mean(sizes) / 1024:.0f} KB on average, in {root}; crop {args.img_size}, one thread"
    )
    pipelines: dict[str, object] = {}
    for resample in ("tensor", "pillow"):
        cfg = DataConfig(name="imagefolder", root=str(root), augment="mae", resample=resample)
        dataset = SeededDataset(open_dataset(cfg, args.img_size), build_transform(cfg, args.img_size), seed=0)
        pipelines[f"data.resample={resample}"] = dataset
    paths = [path for path, _ in next(iter(pipelines.values())).base.samples][: args.images]
    decoders = _decoders()

    rates: dict[str, list[float]] = {name: [] for name in [*pipelines, *decoders]}
    for round_ in range(args.rounds):  # alternating, so a slow moment of the machine hits all alike
        for name, dataset in pipelines.items():
            start = time.perf_counter()
            for index in range(len(paths)):
                dataset[(index, round_)]
            rates[name].append(len(paths) / (time.perf_counter() - start))
        for name, decode in decoders.items():
            start = time.perf_counter()
            for path in paths:
                decode(path)
            rates[name].append(len(paths) / (time.perf_counter() - start))

    best = {name: max(values) for name, values in rates.items()}
    reference = best["data.resample=tensor"]
    print(f"\n{'path':<32}{'img/s per worker':>18}{'median':>10}{'vs tensor':>11}")
    for name, values in rates.items():
        print(f"{name:<32}{best[name]:>18.0f}{float(np.median(values)):>10.0f}{best[name] / reference:>10.2f}x")
    step_rates = [float(r) for r in args.step_rate.split(",")] if args.step_rate else []
    if step_rates:
        print("\nloader workers (one core each) to feed one GPU training at a step rate:")
        print(f"{'img/s of the step':<20}" + "".join(f"{name:>26}" for name in pipelines))
        for rate in step_rates:
            print(f"{rate:<20.0f}" + "".join(f"{math.ceil(rate / best[name]):>26d}" for name in pipelines))
    else:
        print("\npass --step-rate IMG_S[,IMG_S] (from `launch bench pretrain` on the GPU) for workers per GPU")
    return 0
