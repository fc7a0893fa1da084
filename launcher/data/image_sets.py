"""Image data sets from files: an ImageNet-layout folder, and STL-10 and SVHN from their official files.

``imagefolder``: one sub-directory per class with the images inside (ImageNet's layout), listed
by ``list_image_folder`` (regular files only; no directory link back into the tree).

STL-10 (``stl10_binary/``): ``{train,test,unlabeled}_X.bin`` hold uint8 images of 3 x 96 x 96,
each channel stored column-major, and ``{train,test}_y.bin`` uint8 labels 1..10. They are
memory-mapped as they are; the column-major layout is undone per image.

SVHN (``{train,test,extra}_32x32.mat``): MATLAB 5 files whose ``X`` is uint8 32 x 32 x 3 x N
and ``y`` labels 1..10 (10 is the digit 0), usually zlib-compressed inside the file, so they
cannot be memory-mapped. The first use converts each file, streaming, into ``.npy`` arrays
beside it (``extra`` is 1.6 GB of pixels: it is never held whole in memory).
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from launcher.data.registry import BadSample, BaseDataset, DataConfig, EncodedImage, register_dataset
from launcher.errors import DataError

log = logging.getLogger(__name__)

STL10_SPLITS = ("train", "test", "unlabeled")
SVHN_SPLITS = ("train", "test", "extra")


# What PIL raises for a file that is not a (whole) image: truncated, another format, garbage.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_image(path: str | Path | BinaryIO) -> Image.Image:
    """The whole image at ``path`` (or in a file object) decoded, as RGB (a truncated file fails here, not later).

    PIL's own conversion of a 16-bit or 32-bit greyscale image to RGB clips every value above 255,
    so such an image is scaled from its format's range instead (16-bit PNGs: 0..65535).
    """
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I") or image.mode == "F":
            return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
        return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    values = pixels.astype(np.float64)
    if mode == "F":  # floating-point samples: 0..1, or already 0..255
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif mode.startswith("I;16") or values.max(initial=0) > 255:
        top = 65535.0  # PIL reads 16-bit greyscale PNGs and TIFFs as I;16, or as I
    else:
        top = 255.0
    return np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageListing:
    """What an ImageNet-layout folder holds: class names (sorted), (path, class index) samples, and
    the entries passed over with the reason (not a regular file, a directory link into the tree)."""

    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]]


def list_image_folder(root: Path) -> ImageListing:
    """List ``root/CLASS/**/IMAGE``, reading no image and following no link back into the tree.

    Only regular files are samples: a FIFO, socket or device named like an image would block a
    reader for ever. A directory link that points inside the tree, or at a folder above it, is not
    followed (a link ``up -> ..`` would list every image again and again, under the wrong class).
    Each entry passed over is logged once with the reason.
    """
    root = Path(root)
    top = Path(os.path.realpath(root))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise _unreadable(root, e) from None
    listing = ImageListing([], [], [])
    visited = {top}
    for entry in entries:
        if not entry.is_dir():
            continue
        if entry.is_symlink() and _inside_or_above(Path(os.path.realpath(entry.path)), top):
            listing.skipped.append((entry.path, "a directory link into the data set or above it: not followed"))
            continue
        index = len(listing.classes)
        listing.classes.append(entry.name)
        _walk(Path(entry.path), index, top, visited, listing)
    for path, why in listing.skipped:
        log.warning("%s: skipped (%s)", path, why)
    if not listing.classes:
        raise DataError(
            f"{root} holds no class folders. An image folder holds one sub-directory per class with the "
            f"images inside (ImageNet layout: .../train/n01440764/*.JPEG)."
        )
    found = {c for _, c in listing.samples}
    empty = [name for c, name in enumerate(listing.classes) if c not in found]
    if empty:
        raise DataError(
            f"{root}: no image file ({', '.join(IMAGE_EXTENSIONS)}) in the class folder(s) {', '.join(empty)}. "
            f"Put images there or remove the folder(s)."
        )
    return listing


def _walk(folder: Path, index: int, top: Path, visited: set[Path], listing: ImageListing) -> None:
    real = Path(os.path.realpath(folder))
    if real in visited and real != top:
        listing.skipped.append((str(folder), f"{real} is listed already: not followed again"))
        return
    visited.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise _unreadable(folder, e) from None
    for entry in entries:
        if entry.is_dir():  # follows links
            if entry.is_symlink() and _inside_or_above(Path(os.path.realpath(entry.path)), top):
                listing.skipped.append((entry.path, "a directory link into the data set or above it: not followed"))
            else:
                _walk(Path(entry.path), index, top, visited, listing)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            try:
                regular = stat.S_ISREG(entry.stat().st_mode)
            except OSError as e:
                listing.skipped.append((entry.path, f"cannot be read: {e.strerror}"))
                continue
            if regular:
                listing.samples.append((entry.path, index))
            else:
                listing.skipped.append((entry.path, "not a regular file (a FIFO, socket or device): never read"))


def _inside_or_above(target: Path, top: Path) -> bool:
    return target == top or top in target.parents or target in top.parents


def _unreadable(folder: Path, error: OSError) -> DataError:
    return DataError(
        f"cannot list {folder}: {error.strerror}. Give this user read and execute permission on it "
        f"(chmod u+rx), or point data.root elsewhere."
    )


def check_image_folder(root: Path, num_workers: int = 1) -> tuple[int, list[tuple[str, str]]]:
    """Decode every image of an ImageNet-layout folder: (how many, [(path, why) for each bad one]).

    An entry named like an image that is no regular file is a bad one: it is never read.
    """
    from concurrent.futures import ProcessPoolExecutor

    listing = list_image_folder(root)  # list the files, open none
    paths = [path for path, _ in listing.samples]
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            problems = list(pool.map(image_problem, paths, chunksize=256))
    else:
        problems = [image_problem(p) for p in paths]
    not_images = [(p, why) for p, why in listing.skipped if p.lower().endswith(IMAGE_EXTENSIONS)]
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    return len(paths) + len(not_images), bad + not_images


def image_problem(path: str) -> str | None:
    try:
        read_image(path)
    except IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def sequential_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (first 1 - fraction, last fraction), in order: the paper's 80/20 split."""
    cut = n - int(n * fraction)
    return np.arange(cut), np.arange(cut, n)


@register_dataset("imagefolder", encoded=True)
def open_imagefolder(cfg: DataConfig, img_size: int) -> BaseDataset:
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not a directory. For data.name=imagefolder it must hold one "
            f"sub-directory per class with the images inside (ImageNet layout: .../train/n01440764/*.JPEG)."
        )
    listing = list_image_folder(root)
    return LabelledImages(listing.classes, listing.samples)


@register_dataset("stl10")
def open_stl10(cfg: DataConfig, img_size: int) -> BaseDataset:
    return ArrayImages(STL10(Path(cfg.root), cfg.split))


@register_dataset("svhn")
def open_svhn(cfg: DataConfig, img_size: int) -> BaseDataset:
    # Larger sizes are reached by wrap padding (the 32 px digit tiled), as the feature-prediction
    # paper does for its 64 px autoencoders, rather than by upsampling.
    return ArrayImages(SVHN(Path(cfg.root), cfg.split), wrap_to=max(img_size, SVHN.size))


class LabelledImages(Dataset):
    """(RGB PIL image, class label tensor) of an image folder's samples; an unreadable file is a
    ``BadSample`` naming it (the pipeline replaces it; ``launch data check`` lists them all)."""

    def __init__(self, classes: list[str], samples: list[tuple[str, int]]) -> None:
        self.classes, self.samples = classes, samples

    def __len__(self) -> int:
        return len(self.samples)

    def relabel(self, classes: list[str]) -> None:
        """Label every sample by its class's index in ``classes`` (another set's names, e.g. training's)."""
        extra = [name for name in self.classes if name not in classes]
        if extra:
            raise DataError(
                f"the class folder(s) {', '.join(extra)} are not classes of the training set "
                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): a model trained on those "
                f"classes cannot be scored on them. Remove them from the evaluation set or add them to training."
            )
        missing = [name for name in classes if name not in self.classes]
        if missing:
            log.warning("the evaluation set has no images of class(es) %s; scored on the others", ", ".join(missing))
        index = {name: classes.index(name) for name in self.classes}
        self.samples = [(path, index[self.classes[target]]) for path, target in self.samples]
        self.classes = list(classes)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        path, target = self.samples[index]
        try:
            image = read_image(path)
        except IMAGE_ERRORS as e:
            raise BadSample(path, e) from None
        return image, torch.tensor(target, dtype=torch.long)

    def encoded(self, index: int) -> tuple[EncodedImage, torch.Tensor]:
        """The file's bytes, undecoded (``data.decode`` reduced or device decode them)."""
        path, target = self.samples[index]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadSample(path, e) from None
        return EncodedImage(data, path), torch.tensor(target, dtype=torch.long)

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return sequential_split(len(self), fraction)


class ArrayImages(Dataset):
    """(PIL image, class label) from a source with ``image(i)`` (uint8 HWC) and ``label(i)``."""

    def __init__(self, source: STL10 | SVHN, wrap_to: int | None = None) -> None:
        self.source, self.wrap_to = source, wrap_to

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        pixels = self.source.image(index)
        if self.wrap_to and self.wrap_to > pixels.shape[0]:
            extra = self.wrap_to - pixels.shape[0]
            pixels = np.pad(pixels, ((0, extra), (0, extra), (0, 0)), mode="wrap")
        return Image.fromarray(pixels), torch.tensor(self.source.label(index), dtype=torch.long)

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return sequential_split(len(self), fraction)


class STL10:
    """One split of STL-10's binary release; label -1 for the unlabeled split."""

    size = 96

    def __init__(self, root: Path, split: str) -> None:
        if split not in STL10_SPLITS:
            raise DataError(f"STL-10 has no split {split!r}; use one of {', '.join(STL10_SPLITS)} (data.split)")
        folder = Path(root)
        if (folder / "stl10_binary").is_dir():
            folder = folder / "stl10_binary"
        images = folder / f"{split}_X.bin"
        if not images.is_file():
            raise DataError(
                f"STL-10 file {images} is missing. Place the official binary release there (the "
                f"stl10_binary/ folder of stl10_binary.tar.gz from the STL-10 site) and point data.root at it."
            )
        pixels = 3 * self.size * self.size
        if images.stat().st_size % pixels:
            raise DataError(
                f"{images} has {images.stat().st_size} bytes, not a whole number of "
                f"3x96x96 images: the file is truncated or not STL-10. Download it again."
            )
        self.images = np.memmap(images, dtype=np.uint8, mode="r").reshape(-1, 3, self.size, self.size)
        self.labels = None
        if split != "unlabeled":
            labels_file = folder / f"{split}_y.bin"
            if not labels_file.is_file():
                raise DataError(f"STL-10 labels {labels_file} are missing; place the official file there.")
            self.labels = np.fromfile(labels_file, dtype=np.uint8).astype(np.int64) - 1
            if len(self.labels) != len(self.images) or not ((0 <= self.labels) & (self.labels < 10)).all():
                raise DataError(f"{labels_file} does not match {images} (count or values 1..10): re-download both.")

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        """Image i as uint8 HWC (rows, columns, channels)."""
        return np.ascontiguousarray(self.images[i].transpose(2, 1, 0))

    def label(self, i: int) -> int:
        return -1 if self.labels is None else int(self.labels[i])


class SVHN:
    """One split of SVHN's cropped-digits release; label = the digit (0..9)."""

    size = 32

    def __init__(self, root: Path, split: str) -> None:
        if split not in SVHN_SPLITS:
            raise DataError(f"SVHN has no split {split!r}; use one of {', '.join(SVHN_SPLITS)} (data.split)")
        mat = Path(root) / f"{split}_32x32.mat"
        images_npy, labels_npy = mat.with_suffix(".X.npy"), mat.with_suffix(".y.npy")
        if not (images_npy.is_file() and labels_npy.is_file()):
            if not mat.is_file():
                raise DataError(
                    f"SVHN file {mat} is missing. Place the official {mat.name} (cropped digits, format 2) "
                    f"there and point data.root at its folder."
                )
            convert_svhn(mat, images_npy, labels_npy)
        self.images = np.load(images_npy, mmap_mode="r")
        self.labels = np.load(labels_npy)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])


# ----------------------------------------------------------------------------- MATLAB 5 files

_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MI_DTYPES = {
    1: np.int8,
    2: np.uint8,
    3: np.int16,
    4: np.uint16,
    5: np.int32,
    6: np.uint32,
    7: np.float32,
    9: np.float64,
    12: np.int64,
    13: np.uint64,
}


class _Reader:
    """Sequential bytes of one top-level MAT element, decompressed on the fly when needed."""

    def __init__(self, f: BinaryIO, nbytes: int, compressed: bool) -> None:
        self.f, self.left = f, nbytes
        self.inflate = zlib.decompressobj() if compressed else None
        self.buffer = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if self.left == 0:
                tail = self.inflate.flush() if self.inflate else b""
                if not tail:
                    raise DataError("the .mat file ends in the middle of an array: it is truncated")
                self.buffer += tail
                continue
            chunk = self.f.read(min(self.left, 1 << 20))
            self.left -= len(chunk)
            self.buffer += self.inflate.decompress(chunk) if self.inflate else chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def tag(self) -> tuple[int, int, bytes | None]:
        """(type, nbytes, data of a small element or None)."""
        kind, nbytes = struct.unpack("<II", self.read(8))
        if kind >> 16:  # small data element: type and size share the first word
            return kind & 0xFFFF, kind >> 16, struct.pack("<I", nbytes)
        return kind, nbytes, None

    def element(self) -> tuple[int, bytes]:
        kind, nbytes, small = self.tag()
        if small is not None:
            return kind, small[:nbytes]
        data = self.read(nbytes)
        self.read(-nbytes % 8)
        return kind, data


def _mat_arrays(path: Path, sinks: dict[str, callable]) -> None:
    """Stream each named numeric array of a MATLAB 5 file into ``sinks[name](dims, dtype, reader, nbytes)``."""
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128 or not header.startswith(b"MATLAB 5.0 MAT-file") or header[126:128] != b"IM":
            raise DataError(f"{path} is not a little-endian MATLAB 5 .mat file (v7.3/HDF5 files are not supported)")
        while True:
            tag = f.read(8)
            if len(tag) < 8:
                return
            outer, nbytes = struct.unpack("<II", tag)
            start = f.tell()
            if outer in (_MI_MATRIX, _MI_COMPRESSED):
                reader = _Reader(f, nbytes, compressed=outer == _MI_COMPRESSED)
                kind = reader.tag()[0] if outer == _MI_COMPRESSED else outer
                if kind == _MI_MATRIX:
                    reader.element()  # array flags
                    dims = np.frombuffer(reader.element()[1], dtype=np.int32).tolist()
                    name = reader.element()[1].decode()
                    if name in sinks:
                        data_kind, data_bytes, small = reader.tag()
                        if data_kind not in _MI_DTYPES:
                            raise DataError(f"{path}: array {name} has an unsupported data type {data_kind}")
                        sinks.pop(name)(dims, np.dtype(_MI_DTYPES[data_kind]), reader, data_bytes, small)
            f.seek(start + nbytes + (-nbytes % 8 if outer != _MI_COMPRESSED else 0))
            if not sinks:
                return


def convert_svhn(mat: Path, images_npy: Path, labels_npy: Path) -> None:
    """Convert an official SVHN .mat file into memory-mappable uint8 [N, 32, 32, 3] and labels [N]."""
    log.info("converting %s to %s (once)", mat, images_npy)
    tmp_images = images_npy.with_name(f".{images_npy.name}.partial-{os.getpid()}")
    found: dict[str, np.ndarray] = {}

    def images(dims: list[int], dtype: np.dtype, reader: _Reader, nbytes: int, small) -> None:
        if dims[:3] != [32, 32, 3] or dtype != np.uint8 or nbytes != int(np.prod(dims)):
            raise DataError(f"{mat}: X has shape {dims} and type {dtype}, not 32x32x3xN uint8: not SVHN format 2")
        n = dims[3]
        out = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
        per_image, done = 32 * 32 * 3, 0
        while done < n:  # MATLAB is column-major: each image is contiguous as [channel][column][row]
            count = min(4096, n - done)
            block = np.frombuffer(reader.read(count * per_image), dtype=np.uint8).reshape(count, 3, 32, 32)
            out[done : done + count] = block.transpose(0, 3, 2, 1)
            done += count
        out.flush()
        found["X"] = out

    def labels(dims: list[int], dtype: np.dtype, reader: _Reader, nbytes: int, small) -> None:
        raw = small if small is not None else reader.read(nbytes)
        found["y"] = np.frombuffer(raw, dtype=dtype).astype(np.int64) % 10

    try:
        _mat_arrays(mat, {"X": images, "y": labels})
        if set(found) != {"X", "y"} or len(found["y"]) != len(found["X"]):
            raise DataError(f"{mat} lacks matching X and y arrays: it is not an SVHN .mat file")
        np.save(labels_npy, found["y"])
        os.replace(tmp_images, images_npy)
    except PermissionError:
        raise DataError(
            f"cannot write the converted arrays beside {mat}; copy the .mat files to a "
            f"writable folder and point data.root there"
        ) from None
    finally:
        tmp_images.unlink(missing_ok=True)
