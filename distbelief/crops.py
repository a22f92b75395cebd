"""Image crops: the paper's training augmentation and its test-time crops.

Training (GoogLeNet paper, section 6): a crop covering 8%-100% of the image area
with aspect ratio in [3/4, 4/3], resized to the network's input size with a
randomly chosen interpolation, photometric distortions (brightness, contrast,
saturation, hue) and a random horizontal flip; ``Augmentation`` lets a user change
the crop ranges and turn flips or the colour distortion off. Every random choice for
one image comes from its row of ``DRAWS`` uniform numbers (seeded by the loader from
seed, epoch and index). Two stages:

- the crop, where the pixels are: ``crop_image`` per PIL image (folder data, in the
  loader's worker processes, uint8 out), ``crop_batch`` on in-memory tensors;
- ``finish_batch``: colour distortion, flips and normalisation on the whole batch,
  on the device that trains on it.

Evaluation (section 7): ``eval_crops`` gives 1, 10 or 144 crops of one image and
``predict_crops`` averages the softmax over them; ``evaluate`` measures top-1
and top-5 accuracy of a model on a data set.

Pixel values: images are float32 in "normalised" form, ``(x - 0.5) / 0.25`` for
``x`` in [0, 1] (the paper's "RGB colour space with zero mean", with a fixed
scale so that no statistics of the data set are needed).
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

PIXEL_MEAN = 0.5  # of x in [0, 1], every channel
PIXEL_STD = 0.25
CROP_SCALE = (0.08, 1.0)  # fraction of the image area (paper, section 6)
CROP_RATIO = (3 / 4, 4 / 3)  # width / height
INTERPOLATIONS = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC, InterpolationMode.NEAREST)
EVAL_RESIZE = 256 / 224  # the shorter side is resized to image_size * 256/224 before cropping
EVAL_SCALES = (256, 288, 320, 352)  # shorter sides of the 144-crop test, for image_size 224
CROP_COUNTS = (1, 10, 144)
# Photometric distortions as strengths for torchvision's ColorJitter.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.4, 0.1


def normalize(images: Tensor) -> Tensor:
    """Map float pixels in [0, 1] to the normalised form the models take."""
    return (images - PIXEL_MEAN) / PIXEL_STD


def to_normalized(images: Tensor) -> Tensor:
    """uint8 pixels (0..255) to normalised float32; float input is returned as it is."""
    if images.dtype == torch.uint8:
        return normalize(images.float() / 255.0)
    return images.float()


# --------------------------------------------------------------------------- training crops


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """The training augmentation of one data set (every field a user can set).

    ``crop_scale``: area range of the random crop as a fraction of the image (None: no
    crop, the whole image resized); ``crop_ratio``: its width/height range; ``flip``:
    mirror half the images; ``color``: the photometric distortions. The default is the
    paper's recipe (section 6).
    """

    crop_scale: tuple[float, float] | None = CROP_SCALE
    crop_ratio: tuple[float, float] = CROP_RATIO
    flip: bool = True
    color: bool = True

    def __post_init__(self) -> None:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min ≤ max ≤ 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min ≤ max, got {self.crop_ratio}")

    @property
    def random(self) -> bool:
        """Whether it draws anything (an augmentation that does nothing needs no draws)."""
        return self.crop_scale is not None or self.flip or self.color

    def describe(self) -> str:
        parts = []
        if self.crop_scale is not None:
            (a, b), (r, s) = self.crop_scale, self.crop_ratio
            parts.append(f"crops of {a:g}-{b:g} of the area, ratio {r:.3g}-{s:.3g}")
        parts += ["flips"] * self.flip + ["colour distortion"] * self.color
        return ", ".join(parts) or "none"


PAPER_AUGMENTATION = Augmentation()
NO_AUGMENTATION = Augmentation(crop_scale=None, flip=False, color=False)

# Every random choice the augmentation makes for one image is a column of its row of
# draws (uniform in [0, 1), float64), fixed by (seed, epoch, index): which process
# decodes the image, and when, cannot change it.
CROP_ATTEMPTS = 10  # rounds of drawing a crop box before the fallback (as torchvision)
_FALLBACK = 2 * CROP_ATTEMPTS  # columns 0..19: area and log-ratio of each attempt
_TOP, _LEFT = _FALLBACK + 2, _FALLBACK + 3
DRAW_FLIP = _FALLBACK + 4
DRAW_INTERPOLATION = _FALLBACK + 5
DRAW_COLOR = _FALLBACK + 6  # brightness, contrast, saturation, hue
DRAWS = DRAW_COLOR + 4


def crop_box(
    height: int,
    width: int,
    row: Sequence[float],
    *,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[float, float, float, float]:
    """One crop box ``(top, left, h, w)`` (pixels) inside a height×width image from its
    row of draws.

    The area fraction ``h·w / (height·width)`` is drawn uniformly from ``scale`` and
    the aspect ratio ``w / h`` log-uniformly from ``ratio``; a box that does not fit is
    drawn again (``CROP_ATTEMPTS`` rounds, as torchvision does). A box still left after
    that draws a ratio, then an area uniformly among those that fit with it. The box
    lies in the image with its area and ratio inside the bounds (only an image whose own
    aspect is far outside ``ratio`` can force an area below ``scale[0]``). Plain Python
    arithmetic: a few microseconds, where tensor operations on single numbers cost a
    decoder's time.
    """
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for a in range(CROP_ATTEMPTS):
        s = scale[0] + (scale[1] - scale[0]) * row[2 * a]
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * row[2 * a + 1])
        w, h = math.sqrt(s * area * r), math.sqrt(s * area / r)
        if w <= width and h <= height:
            break
    else:
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * row[_FALLBACK])
        s_max = min(width / (height * r), height * r / width, scale[1])
        s_min = min(s_max, scale[0])
        s = s_min + (s_max - s_min) * row[_FALLBACK + 1]
        w, h = min(math.sqrt(s * area * r), width), min(math.sqrt(s * area / r), height)
    return (height - h) * row[_TOP], (width - w) * row[_LEFT], h, w


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    draws: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` crop boxes ``(top, left, h, w)`` (n×4 float32) by ``crop_box``, one per row
    of ``draws`` (n×DRAWS) or of numbers drawn from ``generator``."""
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"bad crop request: n={n}, image {height}x{width}")
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"bad crop bounds: scale={scale}, ratio={ratio}")
    rows = _draws(n, draws, generator).tolist()
    boxes = [crop_box(height, width, row, scale=scale, ratio=ratio) for row in rows]
    return torch.tensor(boxes, dtype=torch.float32).view(n, 4)


def _draws(n: int, draws: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if draws is None:
        return torch.rand(n, DRAWS, generator=generator, dtype=torch.float64)
    if draws.shape != (n, DRAWS):
        raise ValueError(f"need {n}×{DRAWS} draws, got {tuple(draws.shape)}")
    return draws


def _training_box(
    height: int, width: int, values: Sequence[float], augmentation: Augmentation
) -> tuple[float, float, float, float]:
    """The training crop's box (``crop_box``), or the whole image with crops off."""
    if augmentation.crop_scale is None:
        return 0.0, 0.0, float(height), float(width)
    return crop_box(
        height, width, values, scale=augmentation.crop_scale, ratio=augmentation.crop_ratio
    )


def crop_image(data: bytes, row: Tensor, *, size: int, augmentation: Augmentation) -> Tensor:
    """One image's training crop: uint8 3×size×size from its encoded bytes and its draws.

    A JPEG is decoded by simplejpeg (libjpeg-turbo) at the smallest DCT scale (1/2, 1/4,
    1/8) that leaves the crop box (``crop_box``) at least ``size`` pixels wide and high,
    so large crops of large photos decode at a fraction of the cost without losing
    output resolution: the scale Pillow's ``draft`` would choose, and the same pixels as
    Pillow's decoder (libjpeg-turbo too) in a quarter less time, since nothing copies
    them after decoding (``bench.input_pipeline``; ``tests/test_data.py``). Other
    formats, and JPEGs simplejpeg refuses (CMYK), go through Pillow. The box is cut from
    the pixels in place and resized by torch's uint8 kernels (channels last, as decoded
    pixels lie) with a random interpolation: bilinear, bicubic (antialiased when
    shrinking) or nearest (the pixels picked by ``nearest_indices``, twice as fast).
    """
    values = row.tolist()
    pixels = _decode_jpeg(data, size, values, augmentation)
    if pixels is None:
        pixels = _decode_pillow(data, size, values, augmentation)
    decoded, (height, width), (top, left, h, w) = pixels
    with warnings.catch_warnings():  # read only, and torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        decoded = torch.from_numpy(decoded)
    sy, sx = decoded.shape[0] / height, decoded.shape[1] / width  # 1, or the DCT scale
    box = _pixel_box(decoded.shape[0], decoded.shape[1], (top * sy, left * sx, h * sy, w * sx))
    return _cut(decoded, box, size, INTERPOLATIONS[_interpolation(values)].value)


def _draft(
    height: int, width: int, size: int, values: Sequence[float], augmentation: Augmentation
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The training crop's box in this image, and the smallest decoded size (width,
    height) that leaves it at least ``size`` pixels each way."""
    box = _training_box(height, width, values, augmentation)
    return box, (math.ceil(width * size / box[3]), math.ceil(height * size / box[2]))


def dct_scale(height: int, width: int, draft: tuple[int, int]) -> int:
    """The DCT scale denominator Pillow's ``draft`` picks for a JPEG of this size asked
    for at least ``draft`` (width, height): the largest of 8, 4, 2, 1 it allows."""
    allowed = min(width // draft[0], height // draft[1])
    return max((s for s in (8, 4, 2, 1) if s <= allowed), default=1)


# H'×W'×3 uint8 pixels, the image's (H, W) and the crop box in it (top, left, h, w)
Decoded = tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]
# JPEG colour spaces simplejpeg turns into the RGB Pillow gives; CMYK it converts
# differently (off by one here and there), so CMYK goes through Pillow
SIMPLEJPEG_COLOURS = ("YCbCr", "Gray", "RGB")


def _decode_jpeg(
    data: bytes, size: int, values: Sequence[float], augmentation: Augmentation
) -> Decoded | None:
    """A JPEG's pixels at its DCT scale, by simplejpeg; None where it cannot."""
    try:
        height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
        if colours not in SIMPLEJPEG_COLOURS:
            return None
        box, draft = _draft(height, width, size, values, augmentation)
        s = dct_scale(height, width, draft)
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=-(-width // s), min_height=-(-height // s)
        )
    except ValueError:  # not a JPEG, or one libjpeg-turbo cannot read
        return None
    return pixels, (height, width), box


def _decode_pillow(
    data: bytes, size: int, values: Sequence[float], augmentation: Augmentation
) -> Decoded:
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
        box, draft = _draft(height, width, size, values, augmentation)
        if image.format == "JPEG":
            image.draft("RGB", draft)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image), (height, width), box


def _pixel_box(
    height: int, width: int, box: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    """A crop box (top, left, h, w) in pixels of an image of ``height`` × ``width``,
    rounded and kept inside it, at least one pixel each way."""
    top, left, h, w = box
    y0, x0 = min(round(top), height - 1), min(round(left), width - 1)
    return y0, x0, max(1, min(round(h), height - y0)), max(1, min(round(w), width - x0))


def _cut(pixels: Tensor, box: tuple[int, int, int, int], size: int, name: str) -> Tensor:
    """``box`` (top, left, h, w) of H×W×3 uint8 ``pixels`` (any strides) resized to uint8
    3×size×size by interpolation ``name``: torch's uint8 kernels on a CPU (channels
    last, as decoded pixels lie), floats rounded back to pixels on another device."""
    y0, x0, h, w = box
    if name == "nearest":  # the pixels F.interpolate would pick, picked from the
        # decoded rows: twice as fast as it is on channels-last uint8
        rows = nearest_indices(h, size).add_(y0).to(pixels.device)
        cols = nearest_indices(w, size).add_(x0).to(pixels.device)
        return pixels.index_select(0, rows).index_select(1, cols).permute(2, 0, 1).contiguous()
    crop = pixels[y0 : y0 + h, x0 : x0 + w].permute(2, 0, 1).unsqueeze(0)
    if pixels.device.type == "cpu":
        crop = crop.contiguous(memory_format=torch.channels_last)
    else:
        crop = crop.float()
    out = F.interpolate(crop, size=(size, size), mode=name, antialias=True)
    if out.dtype != torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].contiguous()


class EncodedImages(NamedTuple):
    """A batch of image files as they are on disk, for decoding on the device: their
    bytes end to end (uint8), where each one ends (int64) and the data set's indices of
    the images, in batch order."""

    data: Tensor
    ends: Tensor
    indices: Tensor

    @classmethod
    def of(cls, files: Sequence[bytes], indices: Tensor) -> EncodedImages:
        ends = torch.tensor(list(itertools.accumulate(map(len, files))), dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
        return cls(data, ends, indices)

    def files(self) -> list[Tensor]:
        ends = self.ends.tolist()
        return [self.data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def decode_crops(
    encoded: EncodedImages,
    draws: Tensor,
    *,
    size: int,
    augmentation: Augmentation,
    device: torch.device | str,
) -> Tensor:
    """Training crops of a batch of JPEG files, decoded on ``device`` in one call
    (torchvision.io's ``decode_jpeg``: nvJPEG's batched decoder on a GPU, libjpeg-turbo
    on a CPU), cut and resized there: uint8 B×3×size×size on ``device``. The same boxes
    and interpolations as ``crop_image``, from the whole decoded image (no DCT scaling).
    Raises RuntimeError for a file that is not a JPEG or does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # deprecated in torchvision 0.29 for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(encoded.files(), mode=ImageReadMode.RGB, device=device)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for k, (image, values) in enumerate(zip(images, draws.tolist(), strict=True)):
        _, height, width = image.shape
        box = _pixel_box(height, width, _training_box(height, width, values, augmentation))
        name = INTERPOLATIONS[_interpolation(values)].value
        out[k] = _cut(image.permute(1, 2, 0), box, size, name)  # H×W×3, as Pillow's
    return out


def nearest_indices(length: int, size: int) -> Tensor:
    """The source pixels ``F.interpolate(mode="nearest")`` takes to resize ``length``
    pixels to ``size``: ``floor(i · length / size)``, computed in float32 as torch does."""
    scale = torch.tensor(length / size, dtype=torch.float32)
    return (torch.arange(size, dtype=torch.float32) * scale).floor_().long().clamp_(max=length - 1)


def eval_image(image: Image.Image, *, size: int) -> Tensor:
    """The evaluation view of one PIL image: shorter side to size·256/224, centre crop, uint8."""
    image = image.convert("RGB")
    width, height = image.size
    shorter = round(size * EVAL_RESIZE)
    k = shorter / min(width, height)
    resized = (max(shorter, round(width * k)), max(shorter, round(height * k)))
    image = image.resize(resized, resample=Image.Resampling.BILINEAR)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return _to_chw(image.crop((left, top, left + size, top + size)))


def _to_chw(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def _interpolation(row: Sequence[float]) -> int:
    return min(len(INTERPOLATIONS) - 1, int(row[DRAW_INTERPOLATION] * len(INTERPOLATIONS)))


def crop_batch(
    images: Tensor, draws: Tensor, *, size: int | None = None, augmentation: Augmentation
) -> Tensor:
    """Training crops of a batch held in memory: B×3×H×W floats in [0, 1] → uint8 B×3×S×S.

    The same boxes and interpolations as ``crop_image`` (one affine ``grid_sample``
    per interpolation mode), for data sets whose images are tensors already.
    """
    n, _, height, width = images.shape
    size = size or min(height, width)
    boxes = sample_crop_boxes(
        n, height, width, scale=augmentation.crop_scale, ratio=augmentation.crop_ratio, draws=draws
    )
    top, left, h, w = boxes.unbind(1)
    # Affine map from output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    modes = (draws[:, DRAW_INTERPOLATION] * len(INTERPOLATIONS)).long().clamp(max=2)
    out = images.new_empty(n, 3, size, size)
    for k, mode in enumerate(INTERPOLATIONS):
        sel = (modes == k).nonzero().squeeze(1)
        if len(sel):
            out[sel] = F.grid_sample(
                images[sel],
                grid[sel],
                mode=mode.value,
                padding_mode="border",
                align_corners=False,
            )
    return out.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)  # pixels, as decoded ones


GRAY = (0.299, 0.587, 0.114)  # luma weights: gray = GRAY · rgb
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _factor(strength: float, u: Tensor) -> Tensor:
    return 1 + strength * (2 * u - 1)


def colour_twist(draws: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Each image's photometric distortion as one affine colour map ``x ↦ A·x + t·g``.

    Brightness b, contrast c, saturation s and a hue turn h (the strengths of
    torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1), in that order) compose, without
    clamping between them, to ``A = c·b·R_h·S_s`` (``S_s = s·I + (1 − s)·1·grayᵀ``,
    ``R_h`` the hue rotation in YIQ space) and an offset ``(1 − c)·b·g`` along grey,
    ``g`` the image's mean grey level: what contrast pulls the pixels towards. Returns
    ``A`` (B×3×3) and ``t = (1 − c)·b`` (B), on the draws' device.
    """
    u = draws[:, DRAW_COLOR : DRAW_COLOR + 4].to(dtype)
    b, c = _factor(BRIGHTNESS, u[:, 0]), _factor(CONTRAST, u[:, 1])
    sat, turns = _factor(SATURATION, u[:, 2]), HUE * (2 * u[:, 3] - 1)
    n, device = len(u), u.device
    gray = torch.tensor(GRAY, dtype=dtype, device=device)
    eye = torch.eye(3, dtype=dtype, device=device)
    saturate = sat.view(n, 1, 1) * eye + (1 - sat).view(n, 1, 1) * gray.expand(3, 3)
    to_yiq = torch.tensor(_TO_YIQ, dtype=dtype, device=device)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rotate = torch.zeros(n, 3, 3, dtype=dtype, device=device)
    rotate[:, 0, 0] = 1
    rotate[:, 1, 1], rotate[:, 1, 2], rotate[:, 2, 1], rotate[:, 2, 2] = cos, -sin, sin, cos
    hue = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return (c * b).view(n, 1, 1) * hue @ saturate, (1 - c) * b


def photometric_batch(images: Tensor, draws: Tensor, mean_gray: Tensor | None = None) -> Tensor:
    """Brightness, contrast, saturation and hue distortions of B×3×H×W pixels in [0, 1].

    One colour map per image (``colour_twist``; as DALI's ColorTwist), applied in one
    batched pass and clamped to [0, 1] once. torchvision's ColorJitter clamps after
    each of its four steps as well; the two agree wherever no step leaves [0, 1]
    (``tests/test_data.py``). Runs on the images' device. ``mean_gray``: each image's
    mean grey level, when the caller has it (``finish_batch``, exactly, from the pixels).
    """
    twist, toward = colour_twist(draws.to(images.device), images.dtype)
    if mean_gray is None:
        gray = torch.tensor(GRAY, dtype=images.dtype, device=images.device)
        mean_gray = torch.einsum("c,bc->b", gray, images.mean(dim=(2, 3)))
    out = torch.einsum("bij,bjhw->bihw", twist, images)
    return out.add_((toward * mean_gray).view(-1, 1, 1, 1)).clamp_(0, 1)


def _mean_gray(pixels: Tensor) -> Tensor:
    """Each uint8 image's mean grey level in [0, 1], from exact integer sums: the same
    bits whatever the number of threads that add them up."""
    sums = pixels.sum(dim=(2, 3), dtype=torch.int64).double()
    gray = torch.tensor(GRAY, dtype=torch.float64, device=pixels.device)
    return (sums @ gray / (255.0 * pixels.shape[2] * pixels.shape[3])).float()


def finish_batch(
    images: Tensor,
    draws: Tensor | None,
    augmentation: Augmentation,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A batch as the model takes it, on ``device``: uint8 images (0..255) there, then
    (with ``draws``) the colour distortion and the flips, batched on the device, then
    normalised. Without ``draws``, the images as they are."""
    pixels = images.to(device, non_blocking=True)
    if draws is not None and augmentation.flip:
        # on the uint8 pixels, a quarter of float32's bytes, into a new batch (the
        # caller's stays as it was); a mirror commutes with everything below. One flip
        # an image and a stack: a twentieth of the time of indexed copies on a CPU.
        mirror = (draws[:, DRAW_FLIP] < 0.5).tolist()  # the draws are on the host
        pixels = torch.stack([p.flip(-1) if m else p for p, m in zip(pixels, mirror, strict=True)])
    colour = draws is not None and augmentation.color
    # one pass to float: to [0, 1] for the colour distortion, else straight to the
    # normalised form ((x / 255 − mean) / std, the subtraction below)
    x = torch.mul(pixels, 1.0 / 255.0 if colour else 1.0 / (255.0 * PIXEL_STD))
    if colour:
        d = draws.to(device, non_blocking=True)
        x = photometric_batch(x, d, _mean_gray(pixels)).div_(PIXEL_STD)
    return x.sub_(PIXEL_MEAN / PIXEL_STD)


# --------------------------------------------------------------------------- test crops


def _resize_shorter(image: Tensor, shorter: int) -> Tensor:
    """Resize a C×H×W float image so that its shorter side is ``shorter`` pixels."""
    _, height, width = image.shape
    if height <= width:
        size = (shorter, max(shorter, round(width * shorter / height)))
    else:
        size = (max(shorter, round(height * shorter / width)), shorter)
    if size == (height, width):
        return image
    return F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


def _five_crops(image: Tensor, size: int) -> list[Tensor]:
    """Top-left, top-right, bottom-left, bottom-right and centre size×size crops."""
    _, height, width = image.shape
    top, left = (height - size) // 2, (width - size) // 2
    return [
        image[:, :size, :size],
        image[:, :size, width - size :],
        image[:, height - size :, :size],
        image[:, height - size :, width - size :],
        image[:, top : top + size, left : left + size],
    ]


def _three_squares(image: Tensor) -> list[Tensor]:
    """Left, centre and right squares (top, centre and bottom for a portrait image)."""
    _, height, width = image.shape
    side = min(height, width)
    if width >= height:
        starts = (0, (width - side) // 2, width - side)
        return [image[:, :, s : s + side] for s in starts]
    starts = (0, (height - side) // 2, height - side)
    return [image[:, s : s + side, :] for s in starts]


def eval_crops(image: Tensor, *, image_size: int, crops: int) -> Tensor:
    """The paper's test crops of one C×H×W float image: a K×C×S×S tensor, K = ``crops``.

    - 1: centre crop of the image resized to shorter side S·256/224.
    - 10: its 4 corner and centre crops.
    - 144: 4 scales (shorter side S·{256, 288, 320, 352}/224) × 3 squares (left,
      centre, right; top, centre, bottom for portrait) × (4 corner crops, centre crop,
      the square resized to S).

    For 10 and 144 the first half are the crops and the second half their mirrors
    (left-right flips), in the same order.
    """
    if crops not in CROP_COUNTS:
        raise ValueError(f"crops must be one of {CROP_COUNTS}, got {crops}")
    if image.dim() != 3 or image_size < 1:
        raise ValueError(f"expected a C×H×W image and image_size ≥ 1, got {tuple(image.shape)}")
    image = image.float()
    if crops in (1, 10):
        resized = _resize_shorter(image, round(image_size * EVAL_RESIZE))
        views = _five_crops(resized, image_size)
        if crops == 1:
            return views[4].unsqueeze(0).contiguous()
    else:
        views = []
        for scale in EVAL_SCALES:
            resized = _resize_shorter(image, round(scale * image_size / 224))
            for square in _three_squares(resized):
                views.extend(_five_crops(square, image_size))
                views.append(_resize_shorter(square, image_size))
    stacked = torch.stack(views)
    return torch.cat([stacked, stacked.flip(-1)])


# --------------------------------------------------------------------------- prediction


def logits_of(output: Any) -> Tensor:
    """The main classifier's logits from a model output (tensor, tuple, or ``.logits``)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output.logits if hasattr(output, "logits") else output


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_crops(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    crops: int,
    *,
    image_size: int | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Class probabilities (B×num_classes) averaged over each image's ``crops`` crops.

    ``images``: a B×3×H×W tensor or a sequence of 3×H×W tensors, uint8 (0..255) or
    already normalised float. ``image_size`` defaults to each image's shorter side.
    Runs the model (in whatever mode it is in) on the device of its parameters, on the
    crops of whole images at a time, at most max(``chunk_size``, ``crops``) crops.
    Returns float32 probabilities on that device.
    """
    if chunk_size < 1 or len(images) == 0:
        raise ValueError(f"need chunk_size ≥ 1 and an image, got {chunk_size}, {len(images)}")
    device = _model_device(model)
    per_forward = max(1, chunk_size // crops)
    probs = []
    for start in range(0, len(images), per_forward):
        group = images[start : start + per_forward]
        flat = torch.cat(
            [
                eval_crops(
                    to_normalized(im), image_size=image_size or min(im.shape[-2:]), crops=crops
                )
                for im in group
            ]
        )
        p = torch.softmax(logits_of(model(flat.to(device))).float(), dim=1)
        probs.append(p.view(len(group), crops, -1).mean(dim=1))
    return torch.cat(probs)


class EvalSource(Protocol):
    """What ``evaluate`` needs of a data set."""

    num_classes: int
    image_size: int

    def __len__(self) -> int: ...

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...

    def eval_images(self, indices: Tensor) -> tuple[Sequence[Tensor], Tensor]: ...


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: EvalSource,
    *,
    batch_size: int = 256,
    crops: int = 1,
    device: str | torch.device = "cpu",
    max_examples: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy of ``model`` on ``dataset`` (first ``max_examples`` examples).

    ``crops=1`` uses the data set's own evaluation view (``batch(indices)``:
    the whole image for in-memory data, the centre crop for folders); 10 and 144 use
    ``eval_crops`` on the full images. The model is moved to ``device`` and run in eval
    mode; its previous training mode is restored afterwards. Top-5 means top-min(5, C).
    ``progress(done, total)`` is called after every batch when given.
    Returns ``{"top1": float, "top5": float, "examples": int}``.
    """
    if crops not in CROP_COUNTS or batch_size < 1:
        raise ValueError(f"crops must be one of {CROP_COUNTS} and batch_size ≥ 1")
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    if n <= 0:
        raise ValueError("evaluate needs at least one example")
    # With several crops an image, read fewer images at a time (whole decoded images).
    step = batch_size if crops == 1 else max(1, batch_size // crops)
    was_training = model.training
    model.to(device).eval()
    top1 = top5 = 0
    try:
        for start in range(0, n, step):
            idx = torch.arange(start, min(n, start + step))
            if crops == 1:
                x, y = dataset.batch(idx)
                scores = logits_of(model(x.to(device))).float()
            else:
                images, y = dataset.eval_images(idx)
                scores = predict_crops(
                    model, images, crops, image_size=dataset.image_size, chunk_size=batch_size
                )
            k = min(5, dataset.num_classes, scores.shape[1])
            best = scores.topk(k, dim=1).indices.cpu()
            y = y.cpu()
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(dim=1).sum())
            if progress is not None:
                progress(min(n, start + step), n)
    finally:
        model.train(was_training)
    return {"top1": top1 / n, "top5": top5 / n, "examples": n}
