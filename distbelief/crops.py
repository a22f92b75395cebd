"""Image crops: the paper's training augmentation and its test-time crops.

Training (GoogLeNet paper, section 6): a crop covering 8%-100% of the image area
with aspect ratio in [3/4, 4/3], resized to the network's input size with a
randomly chosen interpolation, photometric distortions (brightness, contrast,
saturation, hue) and a random horizontal flip. Two implementations:

- ``train_transform(image_size)``: per image, PIL or tensor in, for folder data.
- ``augment_batch(images, generator=...)``: batched on float tensors
  (``grid_sample`` with one affine grid per image), for in-memory data.

Evaluation (section 7): ``eval_crops`` gives 1, 10 or 144 crops of one image and
``predict_crops`` averages the softmax over them; ``evaluate`` measures top-1
and top-5 accuracy of a model on a data set.

Pixel values: images are float32 in "normalised" form, ``(x - 0.5) / 0.25`` for
``x`` in [0, 1] (the paper's "RGB colour space with zero mean", with a fixed
scale so that no statistics of the data set are needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

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


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Sample ``n`` crop boxes ``(top, left, h, w)`` (float, pixels) inside a height×width image.

    The area fraction ``h·w / (height·width)`` is drawn uniformly from ``scale`` and
    the aspect ratio ``w / h`` log-uniformly from ``ratio``; a box that does not fit is
    drawn again (``attempts`` rounds, as torchvision does). A box still left after that
    draws a ratio, then an area uniformly among those that fit with it. Every box lies
    in the image with its area and ratio inside the bounds (only an image whose own
    aspect is far outside ``ratio`` can force an area below ``scale[0]``).
    """
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"bad crop request: n={n}, image {height}x{width}")
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"bad crop bounds: scale={scale}, ratio={ratio}")
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    area = float(height * width)

    def uniform(k: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(k, generator=generator, dtype=torch.float64)

    s = torch.empty(n, dtype=torch.float64)
    r = torch.empty(n, dtype=torch.float64)
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(attempts):
        k = int(todo.sum())
        if k == 0:
            break
        s_try, r_try = uniform(k, *scale), torch.exp(uniform(k, *log_r))
        w, h = torch.sqrt(s_try * area * r_try), torch.sqrt(s_try * area / r_try)
        fits = (w <= width) & (h <= height)
        where = todo.nonzero().squeeze(1)[fits]
        s[where], r[where] = s_try[fits], r_try[fits]
        todo[where] = False
    k = int(todo.sum())
    if k:
        r_left = torch.exp(uniform(k, *log_r))
        s_max = torch.minimum(width / (height * r_left), height * r_left / width)
        s_max = s_max.clamp(max=scale[1])
        s_min = s_max.clamp(max=scale[0])
        s[todo] = s_min + (s_max - s_min) * uniform(k, 0.0, 1.0)
        r[todo] = r_left
    w = torch.sqrt(s * area * r).clamp(max=width)
    h = torch.sqrt(s * area / r).clamp(max=height)
    top, left = (height - h) * uniform(n, 0.0, 1.0), (width - w) * uniform(n, 0.0, 1.0)
    return torch.stack([top, left, h, w], dim=1).float()


class RandomInterpolationResizedCrop:
    """RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) with a random interpolation.

    Takes a PIL image or a tensor (…×H×W); returns the same kind, size×size. Uses
    torch's global random generator, like torchvision's transforms.
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        interpolations: Sequence[InterpolationMode] = INTERPOLATIONS,
    ) -> None:
        if size < 1 or not interpolations:
            raise ValueError(f"bad crop size {size} or empty interpolations")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.interpolations = tuple(interpolations)

    def __call__(self, image: Any) -> Any:
        height, width = TF.get_size(image)
        box = sample_crop_boxes(1, height, width, scale=self.scale, ratio=self.ratio)
        top, left, h, w = box[0].tolist()
        h_px, w_px = max(1, min(height, round(h))), max(1, min(width, round(w)))
        top_px, left_px = min(round(top), height - h_px), min(round(left), width - w_px)
        mode = self.interpolations[int(torch.randint(len(self.interpolations), ()))]
        return TF.resized_crop(
            image,
            top_px,
            left_px,
            h_px,
            w_px,
            [self.size, self.size],
            interpolation=mode,
            antialias=True,
        )

    def __repr__(self) -> str:
        modes = ", ".join(m.value for m in self.interpolations)
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, interpolations=[{modes}])"
        )


def train_transform(image_size: int) -> Callable[[Any], Tensor]:
    """Per-image training pipeline (paper, section 6): PIL image in, normalised 3×S×S out."""
    return v2.Compose(
        [
            RandomInterpolationResizedCrop(image_size),
            v2.ColorJitter(
                brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE
            ),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3),
        ]
    )


def eval_transform(image_size: int) -> Callable[[Any], Tensor]:
    """Per-image evaluation view: shorter side to image_size·256/224, centre crop, normalise."""
    return v2.Compose(
        [
            v2.Resize(round(image_size * EVAL_RESIZE), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3),
        ]
    )


def flip_batch(images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image of a B×C×H×W batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    out = images.clone()
    out[flip] = images[flip].flip(-1)
    return out


def _rgb_to_gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _jitter(n: int, strength: float, generator: torch.Generator | None) -> Tensor:
    return (1 + strength * (2 * torch.rand(n, generator=generator) - 1)).view(n, 1, 1, 1)


def _rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the hue of each image by ``turns`` of a full circle, in YIQ space."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mix = from_yiq @ rot @ to_yiq  # B×3×3
    return torch.einsum("bij,bjhw->bihw", mix, x)


def photometric_batch(images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, contrast, saturation and hue distortions of B×3×H×W CPU pixels in [0, 1].

    Same strengths as ``train_transform``'s ColorJitter, applied in that fixed order
    with factors drawn per image; the hue turns in YIQ space (a linear map per image).
    """
    n = images.shape[0]
    x = (images * _jitter(n, BRIGHTNESS, generator)).clamp(0, 1)
    mean = _rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + _jitter(n, CONTRAST, generator) * (x - mean)).clamp(0, 1)
    gray = _rgb_to_gray(x)
    x = (gray + _jitter(n, SATURATION, generator) * (x - gray)).clamp(0, 1)
    turns = HUE * (2 * torch.rand(n, generator=generator) - 1)
    return _rotate_hue(x, turns).clamp(0, 1)


def augment_batch(
    images: Tensor, *, image_size: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The paper's training augmentation, batched: B×3×H×W CPU floats in [0, 1] → B×3×S×S.

    Each image gets its own crop box (``sample_crop_boxes``), interpolation (bilinear,
    bicubic or nearest, via ``grid_sample``), photometric distortion and mirror flip.
    """
    n, _, height, width = images.shape
    size = image_size or min(height, width)
    boxes = sample_crop_boxes(n, height, width, generator=generator)
    top, left, h, w = boxes.unbind(1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    # Affine map from output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    modes = torch.randint(len(INTERPOLATIONS), (n,), generator=generator)
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
    return photometric_batch(out.clamp(0, 1), generator=generator)


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

    def batch(self, indices: Tensor, *, augment: bool | None = None) -> tuple[Tensor, Tensor]: ...

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

    ``crops=1`` uses the data set's own evaluation view (``batch(..., augment=False)``:
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
                x, y = dataset.batch(idx, augment=False)
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
