"""``shards``: an image folder written as WebDataset tar shards with one index, read by random access.

``launch data shard SRC --out DIR`` (``write_shards``) writes the samples of an ImageNet-layout
folder, in its listing's order, into ``shard-000000.tar``, ``shard-000001.tar``, ... as
WebDataset does (``KEY.jpg`` with the image, ``KEY.cls`` with the class number), optionally
pre-resized so the shortest side is at most ``max_side`` (as FFCV stores ImageNet), and then
``index.npz``: the sample count, the class names, and each sample's shard, byte offset, size
and label. Opening the data set reads that one file: no directory listing, on every rank; a
sample is one ``pread`` at its offset, so the seeded sampler, exact resume and the bad-sample
policy work as they do on an image folder, and a WebDataset reader can stream the shards.

Converting is resumable: a shard is written aside and renamed when whole, beside a record of
its samples (``shard-NNNNNN.rows.npy``, written first); a killed conversion, run again, keeps
every finished shard untouched and goes on after the last one. ``shards.json``, written first,
names the source and the settings, so that a different conversion never writes into the folder.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from launcher.data.image_sets import IMAGE_ERRORS, read_image, sequential_split
from launcher.data.registry import BadSample, BaseDataset, DataConfig, EncodedImage, register_dataset
from launcher.errors import DataError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "shards.json"
INDEX = "index.npz"
ROW_FIELDS = ("source", "shard", "offset", "size", "label")  # columns of a shard's rows file


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def rows_path(out: Path, number: int) -> Path:
    return out / f"shard-{number:06d}.rows.npy"


# ----------------------------------------------------------------------------- writing


def encode_sample(job: tuple[str, int, int | None, int]) -> tuple[bytes, str, bool]:
    """(bytes to store, extension, whether the file could be read) for one source file.

    Without ``max_side``, or for an image already small enough, the file's own bytes are kept. A
    larger one is resized (bicubic, antialiased) and stored as a JPEG of ``quality``. A file that
    cannot be decoded is stored as it is: training replaces it as it would in the folder.
    """
    path, _, max_side, quality = job
    data = Path(path).read_bytes()
    extension = Path(path).suffix.lower().lstrip(".") or "bin"
    if max_side is None:
        return data, extension, True
    try:
        with Image.open(io.BytesIO(data)) as image:
            if min(image.size) <= max_side:
                image.load()
                return data, extension, True
            image.draft("RGB", (image.width // 2, image.height // 2) if min(image.size) >= 2 * max_side else None)
            image.load()
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            factor = max_side / min(image.size)
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            out = io.BytesIO()
            image.resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=quality)
            return out.getvalue(), "jpg", True
    except IMAGE_ERRORS:
        return data, extension, False


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one file to ``tar``; returns the byte offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))
    # The data ends on the next 512-byte block after it: count back from where the tar now is.
    return tar.offset - math.ceil(len(data) / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def check_out_dir(out: Path, manifest: dict) -> bool:
    """Whether ``out`` holds a conversion of the same source and settings (resume it); an empty or
    missing folder is a new one; any other content is refused, so nothing foreign is written over."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the shards (new, empty, or an earlier conversion)")
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DataError(
            f"--out {out} is not empty and holds no shards of `launch data shard` ({MANIFEST}); "
            f"give a new or empty folder, so that nothing in it is written over"
        ) from None
    if found != manifest:
        differ = sorted(k for k in manifest.keys() | found.keys() if manifest.get(k) != found.get(k))
        raise DataError(
            f"--out {out} holds shards of another conversion ({', '.join(f'{k}: {found.get(k)!r}' for k in differ)}); "
            f"run the command that made them to finish them, or give a new folder"
        )
    return True


def finished_shards(out: Path) -> list[np.ndarray]:
    """The rows of each finished shard, in order; what an interrupted conversion left half-written is removed."""
    done: list[np.ndarray] = []
    while (out / shard_name(len(done))).is_file() and rows_path(out, len(done)).is_file():
        done.append(np.load(rows_path(out, len(done))))
    for leftover in out.glob("shard-*"):
        if int(leftover.name[len("shard-") :].split(".")[0]) >= len(done):
            leftover.unlink()
    for aside in out.glob(".*.partial"):  # a rows file or the index cut short
        aside.unlink()
    return done


def write_shards(
    src: Path,
    out: Path,
    max_side: int | None = None,
    quality: int = 90,
    shard_size_mb: float = 256,
    num_workers: int = 1,
) -> tuple[int, int]:
    """Write the image folder ``src`` as shards in ``out``, or finish an interrupted conversion there.

    Returns (samples, unreadable files among those written now).
    """
    from launcher.data.image_sets import list_image_folder

    if max_side is not None and max_side < 1 or not 1 <= quality <= 100 or shard_size_mb <= 0:
        raise DataError("--max-side must be >= 1, --quality in 1..100 and --shard-size > 0 (MB)")
    if not Path(src).is_dir():
        raise DataError(
            f"{src} is not an image folder: it must hold one sub-directory per class with the images "
            f"inside (ImageNet layout: .../train/n01440764/*.JPEG)."
        )
    folder = list_image_folder(Path(src))  # regular files only, no link back into the tree; opens none
    samples = folder.samples
    manifest = {
        "format": FORMAT,
        "source": str(Path(src).resolve()),
        "num_samples": len(samples),
        "max_side": max_side,
        "quality": quality if max_side is not None else None,
        "shard_size_mb": shard_size_mb,
    }
    resuming = check_out_dir(out, manifest)
    if resuming and (out / INDEX).is_file():
        log.info("%s is complete already", out)
        return len(samples), 0
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    done = finished_shards(out)
    start = int(done[-1][-1, 0]) + 1 if done else 0
    if done:
        log.info("resuming: %d shards finished, from sample %d of %d", len(done), start, len(samples))
    limit = int(shard_size_mb * 2**20)
    jobs = [(path, label, max_side, quality) for path, label in samples[start:]]
    unreadable = 0
    with _encoded(jobs, num_workers) as encoded:
        number, rows, tar, partial = len(done), [], None, None
        for offset_in_jobs, (data, extension, readable) in enumerate(encoded):
            source = start + offset_in_jobs
            if tar is None:
                partial = out / f"{shard_name(number)}.partial"
                tar = tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT)
            key, label = f"{source:09d}", samples[source][1]
            offset = add_member(tar, f"{key}.{extension}", data)
            add_member(tar, f"{key}.cls", str(label).encode())
            rows.append((source, number, offset, len(data), label))
            unreadable += not readable
            if tar.offset >= limit or source == len(samples) - 1:
                tar.close()
                finish_shard(out, number, partial, np.array(rows, dtype=np.int64))
                done.append(np.array(rows, dtype=np.int64))
                log.info("shard %d written (%d of %d samples)", number, source + 1, len(samples))
                number, rows, tar = number + 1, [], None
    write_index(out, done, folder.classes)
    for number in range(len(done)):
        rows_path(out, number).unlink()
    return len(samples), unreadable


class _encoded:
    """The encoded samples of ``jobs`` in order: in ``num_workers`` processes, or in this one."""

    def __init__(self, jobs: list, num_workers: int) -> None:
        self.jobs, self.num_workers, self.pool = jobs, num_workers, None

    def __enter__(self) -> Iterator[tuple[bytes, str, bool]]:
        if self.num_workers <= 1:
            return map(encode_sample, self.jobs)
        self.pool = get_context("spawn").Pool(self.num_workers)
        return self.pool.imap(encode_sample, self.jobs, chunksize=16)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def write_atomic(path: Path, data: bytes) -> None:
    aside = path.with_name(f".{path.name}.partial")
    with open(aside, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(aside, path)


def finish_shard(out: Path, number: int, partial: Path, rows: np.ndarray) -> None:
    """Seal a written shard: its rows first, then the tar under its final name (which marks it finished)."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    buffer = io.BytesIO()
    np.save(buffer, rows)
    write_atomic(rows_path(out, number), buffer.getvalue())
    os.replace(partial, out / shard_name(number))


def write_index(out: Path, done: list[np.ndarray], classes: list[str]) -> None:
    rows = np.concatenate(done) if done else np.zeros((0, len(ROW_FIELDS)), dtype=np.int64)
    meta = {
        "format": FORMAT,
        "num_samples": len(rows),
        "classes": classes,
        "shards": [shard_name(i) for i in range(len(done))],
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.array(json.dumps(meta)),
        shard=rows[:, 1].astype(np.int32),
        offset=rows[:, 2],
        size=rows[:, 3],
        label=rows[:, 4],
    )
    write_atomic(out / INDEX, buffer.getvalue())


# ----------------------------------------------------------------------------- reading


def read_index(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of the index of the shards in ``root``."""
    path = root / INDEX
    if not path.is_file():
        unfinished = (root / MANIFEST).is_file()
        raise DataError(
            f"data.root {root} holds no {INDEX}: "
            + (
                "its conversion did not finish; run the same `launch data shard` command again to finish it."
                if unfinished
                else "make shards of an image folder there with `launch data shard SRC --out DIR`."
            )
        )
    try:
        with np.load(path) as index:
            arrays = {k: index[k] for k in ("shard", "offset", "size", "label")}
            meta = json.loads(str(index["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is not an index of `launch data shard` ({e}); make the shards again.") from None
    if meta.get("format") != FORMAT or len(arrays["offset"]) != meta["num_samples"]:
        raise DataError(f"{path} is of another format or cut short; make the shards again with `launch data shard`.")
    return meta, arrays


@register_dataset("shards", encoded=True)
def open_shards(cfg: DataConfig, img_size: int) -> BaseDataset:
    return ShardImages(Path(cfg.root))


class ShardImages(Dataset):
    """(RGB PIL image, class label) from WebDataset shards by their index; a sample is one read at its offset."""

    def __init__(self, root: Path) -> None:
        self.root = root
        meta, arrays = read_index(root)
        self.classes, self.shards = meta["classes"], [root / name for name in meta["shards"]]
        self.shard, self.offset, self.size = arrays["shard"], arrays["offset"], arrays["size"]
        self.labels = torch.from_numpy(arrays["label"])
        self._files: dict[int, int] = {}  # shard -> file descriptor, opened on first use in each process

    def __getstate__(self) -> dict:  # a worker started by spawn opens its own files
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def __len__(self) -> int:
        return len(self.offset)

    def encoded(self, index: int) -> tuple[EncodedImage, torch.Tensor]:
        shard, offset, size = int(self.shard[index]), int(self.offset[index]), int(self.size[index])
        name = f"{self.shards[shard]}@{offset}"
        try:
            fd = self._files.get(shard)
            if fd is None:
                fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
            data = os.pread(fd, size, offset)  # no file position: safe in forked workers sharing the descriptor
        except OSError as e:
            raise BadSample(name, e) from None
        if len(data) != size:
            raise BadSample(name, EOFError(f"{len(data)} of {size} bytes: the shard is cut short"))
        return EncodedImage(data, name), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        encoded, label = self.encoded(index)
        try:
            return read_image(io.BytesIO(encoded.data)), label
        except IMAGE_ERRORS as e:
            raise BadSample(encoded.name, e) from None

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return sequential_split(len(self), fraction)
