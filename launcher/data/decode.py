"""MAE's pretraining crop from the encoded file: decoded at a reduced scale on the loader worker, or
decoded in batches on the training device.

Both paths read the file's bytes (``EncodedImage``), take the image size from its header and
draw the crop box and the flip exactly as the ``tensor`` path draws them (torchvision's
``RandomResizedCrop.get_params``, then one ``torch.rand``, from the RNG the sample's seed has
set), so a key gives the same crop whichever path reads it.

``ReducedDecodeCrop`` (``data.decode: reduced``) asks libjpeg-turbo, through Pillow's ``draft``,
for the image at 1/2, 1/4 or 1/8 of its size (the DCT scaled, which costs less than decoding
every pixel) when the crop's shortest side at that scale is still at least the output size, and
Pillow resizes the crop's box, which then falls between pixels, in one bicubic antialiased pass.
Otherwise simplejpeg (libjpeg-turbo, straight into a NumPy array: no Pillow image to copy out of)
decodes a plain RGB JPEG, Pillow anything else, and the 8-bit crop is resized by torch's
antialiased bicubic kernel (twice as fast as Pillow's on this machine): the ``tensor`` path's
images bit for bit, with less work around them (no seeding of Python's and NumPy's RNGs). The
worker hands the 8-bit square on, a quarter of the floats' bytes to collate and to pass between
processes; ``DeviceNormalize``, in the training process, makes it floats and normalises it on
the training device, in batches (as FFCV does).

``DeviceDecodeCrop`` (``data.decode: device``) is the worker's half: it sends the JPEG's bytes
with the box and the flip. ``DeviceDecoder`` is the training process's half: torchvision's
batched ``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU), then the crop, the
resize, the flip and the normalisation, on the training device. A file that is not a plain
JPEG (a PNG, a CMYK or truncated JPEG) is decoded by Pillow on the worker instead and its
pixels travel in place of the bytes; the device crops them alike. A file Pillow cannot read is a
``BadSample``, replaced as on every path.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from launcher.data.image_sets import IMAGE_ERRORS
from launcher.data.registry import BadSample, EncodedImage
from launcher.errors import DataError

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios, as MAE uses them
DCT_SCALES = (8, 4, 2)  # the reductions libjpeg can decode at, largest first
JPEG_END = b"\xff\xd9"


def open_header(encoded: EncodedImage) -> Image.Image:
    """The image with only its header read (size, mode, format): a file with no image header is a ``BadSample``."""
    try:
        return Image.open(io.BytesIO(encoded.data))
    except IMAGE_ERRORS as e:
        raise BadSample(encoded.name, e) from None


def draw_crop(image: Image.Image, scale: tuple[float, float]) -> tuple[tuple[int, int, int, int], bool]:
    """((top, left, height, width), flip) for an image of this size, drawn as the ``tensor`` path draws them."""
    box = v2.RandomResizedCrop.get_params(image, list(scale), list(RATIO))
    return box, bool(torch.rand(1) < 0.5)


def dct_reduction(crop_side: int, out_size: int) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) at which a crop side of ``crop_side`` still covers ``out_size``."""
    return next((s for s in DCT_SCALES if crop_side >= s * out_size), 1)


def load_rgb(image: Image.Image, name: str) -> Image.Image:
    """Decode the opened image as RGB; a file that fails here (truncated, corrupt) is a ``BadSample``."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except IMAGE_ERRORS as e:
        raise BadSample(name, e) from None


def decode_rgb(image: Image.Image, encoded: EncodedImage) -> np.ndarray:
    """The whole image as an (H, W, 3) uint8 array: simplejpeg for an RGB JPEG, Pillow for anything else.

    Both decode with libjpeg-turbo's defaults (accurate integer IDCT, smooth chroma upsampling):
    the same pixels. simplejpeg's strict mode makes a truncated or corrupt JPEG a ``BadSample``,
    as Pillow's decoder does.
    """
    if image.format != "JPEG" or image.mode != "RGB":
        return np.asarray(load_rgb(image, encoded.name))
    try:
        return simplejpeg.decode_jpeg(encoded.data, colorspace="RGB")
    except ValueError as e:
        raise BadSample(encoded.name, e) from None


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32, scaled to [0, 1] and normalised: the ``tensor`` path's last steps."""
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


class ReducedDecodeCrop:
    """The loader worker's half of ``data.decode: reduced``: MAE's random resized crop + flip of an encoded
    image, decoded at the smallest DCT scale the crop allows, as a uint8 (3, img_size, img_size) tensor
    (``DeviceNormalize`` normalises it)."""

    reads_encoded = True
    host_rngs = False  # draws only from torch's RNG

    def __init__(self, img_size: int, scale: tuple[float, float]) -> None:
        self.img_size, self.scale = img_size, scale

    def __call__(self, encoded: EncodedImage) -> torch.Tensor:
        image = open_header(encoded)
        (top, left, height, width), flip = draw_crop(image, self.scale)
        reduction = dct_reduction(min(height, width), self.img_size) if image.format == "JPEG" else 1
        if reduction > 1:
            # Pillow picks the largest scale s with size // request >= s: asking for size // reduction
            # gives exactly `reduction`; pixel (x, y) of the decoded image covers (s x, s y) of the file's.
            image.draft("RGB", (image.width // reduction, image.height // reduction))
            # The box falls between the reduced pixels: Pillow resamples such a box exactly.
            box = (left / reduction, top / reduction, (left + width) / reduction, (top + height) / reduction)
            small = load_rgb(image, encoded.name).resize((self.img_size,) * 2, Image.Resampling.BICUBIC, box=box)
            out = torch.from_numpy(np.array(small)).permute(2, 0, 1)
        else:
            # torch's antialiased bicubic resize of 8-bit images, the tensor path's, on the crop alone.
            pixels = torch.from_numpy(decode_rgb(image, encoded)).permute(2, 0, 1)
            out = F.resized_crop(
                pixels, top, left, height, width, [self.img_size] * 2, v2.InterpolationMode.BICUBIC, antialias=True
            )
        return out.flip(-1) if flip else out


class DeviceNormalize:
    """The training process's half of ``data.decode: reduced``: the batch's uint8 crops -> normalised
    float32 ``image`` on ``device``, in one pass over the batch (on a GPU, after a transfer of a quarter
    of the floats' bytes)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, batch: dict, device: torch.device) -> dict:
        batch["image"] = normalize(batch["image"].to(device, non_blocking=True), self.mean, self.std)
        return batch


def sends_bytes(image: Image.Image, data: bytes) -> bool:
    """Whether the device may decode this file: a baseline or progressive JPEG in RGB or grey, not cut short.

    The end-of-image marker is a cheap test for a truncated file; a whole JPEG followed by padding
    fails it too and is simply decoded on the worker.
    """
    return image.format == "JPEG" and image.mode in ("RGB", "L") and data.endswith(JPEG_END)


class DeviceDecodeCrop:
    """The loader worker's half of ``data.decode: device``: the bytes (or, for a file that is not a plain
    JPEG, the pixels Pillow decodes here), the image size, the crop box and the flip."""

    reads_encoded = True
    host_rngs = False

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, encoded: EncodedImage) -> dict[str, torch.Tensor]:
        image = open_header(encoded)
        box, flip = draw_crop(image, self.scale)
        decoded = not sends_bytes(image, encoded.data)
        if decoded:
            pixels = np.asarray(load_rgb(image, encoded.name), dtype=np.uint8)
            payload = torch.from_numpy(pixels.copy()).view(-1)
        else:
            payload = torch.frombuffer(bytearray(encoded.data), dtype=torch.uint8)
        return {
            "encoded": payload,
            "size": torch.tensor([image.height, image.width]),
            "box": torch.tensor(box),
            "flip": torch.tensor(flip),
            "decoded": torch.tensor(decoded),
        }


class DeviceDecoder:
    """The training process's half of ``data.decode: device``: a batch of bytes and boxes -> ``image`` on ``device``.

    A JPEG that the device's decoder rejects although Pillow read its header and it ends where a
    JPEG ends (a corrupt middle) is replaced by the next sample of the batch that decoded and
    counted in ``bad``: still a function of the batch's keys, so resume stays exact.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)

    def decode(self, encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """Decode a list of JPEGs on ``device`` (CHW uint8, RGB), in one batch; ``None`` for each that fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return []
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the batch: find which, one at a time
            images: list[torch.Tensor | None] = []
            for data in encoded:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
            return images

    def __call__(self, batch: dict, device: torch.device) -> dict:
        encoded, sizes, boxes = batch.pop("encoded"), batch.pop("size").tolist(), batch.pop("box").tolist()
        flips, decoded = batch.pop("flip"), batch.pop("decoded").tolist()
        jpegs = [i for i, done in enumerate(decoded) if not done]
        images: list[torch.Tensor | None] = [None] * len(encoded)
        for i, image in zip(jpegs, self.decode([encoded[i] for i in jpegs], device)):
            images[i] = image
        for i, done in enumerate(decoded):
            if done:
                height, width = sizes[i]
                images[i] = encoded[i].to(device, non_blocking=True).view(height, width, 3).permute(2, 0, 1)
        sources = []
        for i, image in enumerate(images):
            if image is None:
                batch["bad"][i] += 1
            sources.append(i if image is not None else self.replacement(images, i))
        out = torch.stack(
            [
                F.resized_crop(images[j], *boxes[j], [self.img_size] * 2, v2.InterpolationMode.BICUBIC, antialias=True)
                for j in sources
            ]
        )
        flips = flips[sources].to(device, non_blocking=True)
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
        batch["image"] = normalize(out, self.mean, self.std)
        return batch

    @staticmethod
    def replacement(images: list[torch.Tensor | None], i: int) -> int:
        for step in range(1, len(images)):
            j = (i + step) % len(images)
            if images[j] is not None:
                return j
        raise DataError(
            "no image of a whole batch could be decoded on the training device although their headers read: "
            "check the data set with `launch data check`, or train with data.decode=full"
        )
