"""``launch bench data``: images per second per loader worker of the pretraining input pipeline.

The pipeline measured is the project's own: ``SeededDataset`` with MAE's pretraining transform
(decode, random resized crop, flip, normalise), one sample at a time on one thread, as one
DataLoader worker runs it, collating batches and moving them to shared memory for the training
process. Its paths are timed side by side, round after round, on an
ImageFolder of generated JPEGs shaped like ImageNet's (500x375, quality 90, textured so that they
compress like photographs): ``tensor`` and ``pillow`` (``data.resample``), ``reduced`` and
``device-cpu`` (``data.decode``; the device's half runs on this core too), the same JPEGs as
shards (``data.name=shards``) kept as they are and pre-resized to ``--max-side``, and, where there
is CUDA, ``device-cuda``; decoding alone beside them. One line per path reads ``path NAME: N img/s
per worker (R x tensor)``: the worker's half. A path with a training-process half (``device``'s
decode and crop, ``reduced``'s normalisation of its uint8 crops) has that half's img/s on its own
line, ``main process of NAME``, measured on this CPU (or the GPU for ``device-cuda``). Given the
training step rates of ``launch bench pretrain`` (``--step-rate``), it prints how many workers
each path needs to keep one GPU fed. Last, start-up: a fresh process to its first batch, from
shards whose index names ``--startup-samples`` samples, and from listing an ImageFolder of as
many files (hard links, so the tree takes no disk space beyond its directory entries).
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
CPU = torch.device("cpu")


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
    """Decode-only contenders: Pillow (what the full paths use), and simplejpeg when it is installed."""
    from launcher.data.image_sets import read_image

    decoders: dict[str, object] = {"decode-only-pillow": read_image}
    try:
        import simplejpeg

        decoders["decode-only-simplejpeg"] = lambda path: simplejpeg.decode_jpeg(Path(path).read_bytes())
    except ImportError:
        pass
    return decoders


class WorkerPath:
    """One path as a DataLoader worker and the training process run it: the samples of each batch on
    the worker, collated and moved to shared memory (what sending a batch to the training process
    costs the worker), then the path's device stage, if it has one, in the training process on
    ``device``. ``worker_seconds`` and ``main_seconds`` add up the two halves apart."""

    def __init__(self, root: Path, img_size: int, device: torch.device = CPU, batch_size: int = 32, **data) -> None:
        from launcher.data import DataConfig
        from launcher.data.transforms import build_device_stage

        self.dataset = open_path(root, img_size, **data)
        self.stage = build_device_stage(DataConfig(root=str(root), augment="mae", **data), img_size)
        self.device, self.batch_size = device, batch_size
        self.worker_seconds = self.main_seconds = 0.0

    def run(self, keys: list[tuple[int, int]]) -> None:
        from launcher.data.sampling import collate

        for start in range(0, len(keys), self.batch_size):
            begin = time.perf_counter()
            batch = collate([self.dataset[key] for key in keys[start : start + self.batch_size]])
            for value in batch.values():  # the worker's side of the queue to the training process
                for tensor in value if isinstance(value, list) else [value]:
                    tensor.share_memory_()
            middle = time.perf_counter()
            self.worker_seconds += middle - begin
            if self.stage is not None:
                self.stage(batch, self.device)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.main_seconds += time.perf_counter() - middle


def open_path(root: Path, img_size: int, **data):
    """The training data set of one path: ``SeededDataset`` over the folder or shards with MAE's crop."""
    from launcher.data import DataConfig, open_dataset
    from launcher.data.sampling import SeededDataset
    from launcher.data.transforms import build_transform

    cfg = DataConfig(root=str(root), augment="mae", **data)
    return SeededDataset(open_dataset(cfg, img_size), build_transform(cfg, img_size), seed=0)


def bench_data(args: argparse.Namespace) -> int:
    from launcher.bench.compute import describe_machine
    from launcher.data.shards import write_shards

    torch.set_num_threads(1)  # one loader worker is one process on one core
    root = make_jpeg_folder(Path(args.root), args.images)
    sizes = [p.stat().st_size for p in sorted(root.glob("*/*.JPEG"))[: args.images]]
    print(describe_machine(torch.device("cpu")))
    print(
        f"{len(sizes)} JPEGs of {IMAGENET_SHAPE[1]}x{IMAGENET_SHAPE[0]} at quality 90, "
        f"{np.mean(sizes) / 1024:.0f} KB on average, in {root}; crop {args.img_size}, one thread"
    )
    shards = Path(f"{args.root}-shards")
    resized = Path(f"{args.root}-shards-{args.max_side}")
    write_shards(root, shards, num_workers=1)
    write_shards(root, resized, max_side=args.max_side, num_workers=1)
    pipelines = {
        "tensor": WorkerPath(root, args.img_size, name="imagefolder", resample="tensor"),
        "pillow": WorkerPath(root, args.img_size, name="imagefolder", resample="pillow"),
        "reduced": WorkerPath(root, args.img_size, name="imagefolder", decode="reduced"),
        "device-cpu": WorkerPath(root, args.img_size, name="imagefolder", decode="device"),
        "shards-reduced": WorkerPath(shards, args.img_size, name="shards", decode="reduced"),
        f"shards-{args.max_side}-reduced": WorkerPath(resized, args.img_size, name="shards", decode="reduced"),
    }
    if torch.cuda.is_available():
        pipelines["device-cuda"] = WorkerPath(root, args.img_size, torch.device("cuda"), decode="device")
    paths = [path for path, _ in pipelines["tensor"].dataset.base.samples][: args.images]
    count = len(paths)
    decoders = _decoders()

    rates: dict[str, list[float]] = {name: [] for name in [*pipelines, *decoders]}
    main_rates: dict[str, list[float]] = {name: [] for name, path in pipelines.items() if path.stage is not None}
    for round_ in range(args.rounds):  # alternating, so a slow moment of the machine hits all alike
        keys = [(index, round_) for index in range(count)]
        for name, pipeline in pipelines.items():
            pipeline.worker_seconds = pipeline.main_seconds = 0.0
            pipeline.run(keys)
            rates[name].append(count / pipeline.worker_seconds)
            if name in main_rates:
                main_rates[name].append(count / pipeline.main_seconds)
        for name, decode in decoders.items():
            start = time.perf_counter()
            for path in paths:
                decode(path)
            rates[name].append(count / (time.perf_counter() - start))

    best = {name: max(values) for name, values in rates.items()}
    reference = best["tensor"]
    print(
        f"\ntimed {args.rounds} rounds of {count} images per path, alternating; best round, median in brackets; "
        "a worker's img/s include collating batches of 32 and moving them to shared memory"
    )
    for name, values in rates.items():
        print(
            f"path {name}: {best[name]:.0f} img/s per worker ({best[name] / reference:.2f} x tensor)"
            f"  [median {float(np.median(values)):.0f}]"
        )
    for name, values in main_rates.items():
        stage, device = type(pipelines[name].stage).__name__, pipelines[name].device
        where = torch.cuda.get_device_name() if device.type == "cuda" else "this CPU, one thread"
        print(
            f"main process of {name}: {max(values):.0f} img/s of {stage} on {where}, the training process's half, "
            f"not in the worker's img/s  [median {float(np.median(values)):.0f}]"
        )
    step_rates = [float(r) for r in args.step_rate.split(",")] if args.step_rate else []
    if step_rates:
        print("\nloader workers (one core each) to feed one GPU training at a step rate:")
        print(f"{'img/s of the step':<20}" + "".join(f"{name:>22}" for name in pipelines))
        for rate in step_rates:
            print(f"{rate:<20.0f}" + "".join(f"{math.ceil(rate / best[name]):>22d}" for name in pipelines))
    else:
        print("\npass --step-rate IMG_S[,IMG_S] (from `launch bench pretrain` on the GPU) for workers per GPU")
    if args.startup_samples:
        print_startup(Path(args.root), shards, args.startup_samples, args.img_size)
    return 0


# A fresh process: import, open the data set, build the sampler and loader, take the first batch.
FIRST_BATCH = """
import sys
from launcher.bench.data import open_path
from launcher.data.sampling import ResumableSampler, build_loader
dataset = open_path(sys.argv[1], int(sys.argv[3]), name=sys.argv[2], decode="reduced")
sampler = ResumableSampler(len(dataset), 32, 1, 0, 1, seed=0)
next(iter(build_loader(dataset, sampler, num_workers=0, pin_memory=False)))
print(len(dataset))
"""


def first_batch_seconds(root: Path, name: str, img_size: int) -> tuple[float, int]:
    """Seconds from starting a Python process to its first training batch of ``root``, and the samples it saw."""
    import subprocess
    import sys

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, str(root), name, str(img_size)], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - start, int(done.stdout.split()[-1])


def synthetic_index(shards: Path, out: Path, count: int) -> Path:
    """Shards whose index names ``count`` samples: the real ones of ``shards``, over and over."""
    import json
    import shutil

    from launcher.data.shards import INDEX, read_index

    meta, arrays = read_index(shards)
    if out.is_dir() and read_index(out)[0]["num_samples"] == count:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in meta["shards"]:
        (out / name).symlink_to((shards / name).resolve())
    repeat = np.arange(count) % len(arrays["offset"])
    np.savez(
        out / INDEX,
        meta=np.array(json.dumps({**meta, "num_samples": count})),
        **{key: values[repeat] for key, values in arrays.items()},
    )
    return out


def linked_folder(source: Path, out: Path, count: int) -> Path:
    """An ImageFolder of ``count`` files in 1000 classes, each a hard link to a generated JPEG: a tree
    as big as ImageNet's to list, for no disk space beyond its directory entries."""
    import os

    done = out / "complete"
    if done.is_file() and int(done.read_text()) == count:
        return out
    jpegs = sorted(source.glob("*/*.JPEG"))
    for i in range(count):
        folder = out / f"n{i % 1000:08d}"
        if i < 1000:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:08d}.JPEG"
        if not path.exists():
            os.link(jpegs[i % len(jpegs)], path)
    done.write_text(str(count))
    return out


def print_startup(root: Path, shards: Path, count: int, img_size: int) -> None:
    index = synthetic_index(shards, Path(f"{root}-index-{count}"), count)
    folder = linked_folder(root, Path(f"{root}-tree-{count}"), count)
    print(f"\nstart-up: a fresh process to its first batch of 32, {count} samples")
    for name, data_root, what in (
        ("shards", index, "one index file (synthetic: the generated shards' samples repeated)"),
        ("imagefolder", folder, "listing a tree of hard links to the generated JPEGs"),
    ):
        seconds, seen = first_batch_seconds(data_root, name, img_size)
        print(f"start-up {name}: {seconds:.1f} s to the first batch of {seen} samples ({what})")
