"""``data.decode: gpu``: JPEG decode, crop, resize, flip and RandAugment on the training device, batched.

The workers make every random draw exactly as the CPU path does (timm's crop box and interpolation, the
flip, RandAugment's ops, levels and interpolations, keyed per sample), record them instead of applying
them, and ship the JPEG undecoded (``TrainDraws``). ``DeviceCrop`` decodes a whole micro-batch on the
training device with torchvision's ``decode_jpeg`` (nvJPEG on CUDA; libjpeg-turbo on a CPU device, which
is how the tests run this path) and replays the draws with batched tensor ops: the number of kernels a
micro-batch launches does not grow with its images (decoding aside), and nothing is read back from the
device. The draws are on the host already, so which images take which op, their crop boxes, matrices
and factors are worked out there and reach the device in one copy; each op kind then runs once, on
the images that drew it. The distribution is the CPU path's draw for draw; the pixels are close to it,
not equal: resizing and the geometric ops interpolate in float (``grid_sample``'s bicubic is a = -0.75,
Pillow's a = -1), and the colour ops follow torchvision's versions of Pillow's (the same formulas,
rounded differently). The CPU path stays the reference and the default.

What the device cannot decode is handled as on the CPU: images that are not plain JPEGs (PNG, CMYK) are
decoded by Pillow in the worker and shipped as pixels, and so is a JPEG without its end-of-image marker
(nvJPEG may decode a truncated file to garbage without an error; Pillow raises, and the reader counts it
corrupt); a JPEG that fails to decode on the device is replaced by the good image before it in its
micro-batch (its draws, label and id too) and counted as corrupt.

On CUDA, decoding runs on a stream of its own: torchvision's nvJPEG decode writes into its output
without waiting for the kernels still queued on the caller's stream (pytorch/vision #9606), so its
outputs are allocated from that stream's pool, which the training stream's freed blocks never enter, and
the training stream waits for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import auto_augment
from torch.profiler import record_function
from torchvision.io import ImageReadMode, decode_jpeg

from orchestrator.data import randaugment, transforms
from orchestrator.data.device import to_device
from orchestrator.data.randaugment import GEOMETRIC, RandAugmentDraws
from orchestrator.errors import DataError, RecipeError

log = logging.getLogger(__name__)

JPEG, PIXELS = 0, 1  # payload kinds; PIXELS are uint8 CHW bytes
HEAD = 9  # kind, height, width, top, left, h, w, bicubic, flip; then (op, level, bicubic) per RandAugment layer
# Elements of one crop-and-resize pass's float input (512 MB): ImageNet-sized micro-batches of 128 take one
# pass; micro-batches of large photos are split, so memory stays bounded (shards written with --max-side avoid it).
BUDGET = 1 << 27
EOI = b"\xff\xd9"


def _pillow_matrix(op: Callable[..., Any], level: float, width: int, height: int) -> tuple[float, ...]:
    """The output-to-input affine matrix Pillow applies for a geometric op (as in timm's and Pillow's code)."""
    if op is auto_augment.rotate:  # Pillow's rotate about the centre
        rad = -math.radians(level % 360.0)
        a, b, d, e = math.cos(rad), math.sin(rad), -math.sin(rad), math.cos(rad)
        cx, cy = width / 2, height / 2
        return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy
    return randaugment.MATRICES[op](width, height, level)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _warp(img: torch.Tensor, matrices: torch.Tensor, bicubic: bool, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's affine transform of uint8 NCHW images, each by its own row of ``matrices`` (N, 6), through one
    ``grid_sample``: the same geometry (pixel centres mapped, edges clamped, ``fill`` where the source point
    lies outside), float interpolation."""
    n, _, h, w = img.shape
    ys = (torch.arange(h, device=img.device, dtype=torch.float32) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=img.device, dtype=torch.float32) + 0.5).view(1, 1, w)
    a = matrices.float().view(n, 6, 1, 1).unbind(1)
    xin, yin = a[0] * xs + a[1] * ys + a[2], a[3] * xs + a[4] * ys + a[5]
    grid = torch.stack((2 * xin / w - 1, 2 * yin / h - 1), dim=-1)
    out = F.grid_sample(img.float(), grid, mode="bicubic" if bicubic else "bilinear", padding_mode="border",
                        align_corners=False)
    inside = ((xin >= 0) & (xin < w) & (yin >= 0) & (yin < h))[:, None]
    return torch.where(inside, out.round().clamp(0, 255), fill.view(1, -1, 1, 1)).to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of uint8 RGB, floored, as float (N, 1, H, W)."""
    r, g, b = img.float().unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()[:, None]


def _blend(img: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a factor per image."""
    ratio = _per_image(ratio)
    return (img.float() * ratio + other * (1 - ratio)).clamp_(0, 255).to(torch.uint8)


def _autocontrast(img: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast, without its boolean-mask assignment (a host sync on CUDA)."""
    x = img.float()
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo) / 255)
    return ((x - torch.where(flat, 0.0, lo)) / scale).clamp_(0, 255).to(torch.uint8)


def _posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``randaugment.posterize`` per image: 8 bits or more keep the image, 0 or fewer keep nothing."""
    bits = _per_image(bits).long().clamp(0, 8)
    mask = (255 << (8 - bits)) & 255
    return img & mask.to(torch.uint8)


def _solarize(img: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    return torch.where(img >= _per_image(thresh).trunc(), 255 - img, img)


def _solarize_add(img: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    return torch.where(img < thresh, (img.int() + _per_image(add).trunc().int()).clamp(0, 255).to(torch.uint8), img)


_SHARPNESS: dict[torch.device, torch.Tensor] = {}


def _sharpness_kernel(device: torch.device) -> torch.Tensor:
    """torchvision's 3x3 smoothing kernel, made once per device (a copy per micro-batch would wait for the device)."""
    if device not in _SHARPNESS:
        a, b = 1.0 / 13.0, 5.0 / 13.0
        _SHARPNESS[device] = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=device).expand(3, 1, 3, 3)
    return _SHARPNESS[device]


def _sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness (the interior blended with a 3x3 smoothing, edges kept) per image."""
    if img.shape[-1] <= 2 or img.shape[-2] <= 2:
        return img
    kernel = _sharpness_kernel(img.device)
    out = img.float()
    blurred = F.conv2d(out, kernel, groups=3).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner) * (1 - _per_image(factor)))
    return out.clamp_(0, 255).to(torch.uint8)


# timm's op functions -> the same op on uint8 NCHW images, each with its own level (a float tensor (N,)).
COLOUR_OPS: dict[Callable[..., Any], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    auto_augment.auto_contrast: _autocontrast,
    auto_augment.equalize: lambda img, _: TF.equalize(img),
    auto_augment.invert: lambda img, _: 255 - img,
    randaugment.posterize: _posterize,
    auto_augment.posterize: _posterize,
    auto_augment.solarize: _solarize,
    auto_augment.solarize_add: _solarize_add,
    auto_augment.color: lambda img, factor: _blend(img, _grey(img), factor),
    auto_augment.contrast: lambda img, factor: _blend(img, _grey(img).mean(dim=(-3, -2, -1), keepdim=True), factor),
    auto_augment.brightness: lambda img, factor: _blend(img, 0.0, factor),
    auto_augment.sharpness: _sharpness,
}
DEVICE_OPS = (*GEOMETRIC, *COLOUR_OPS)  # an op's place here is its id in the draws
_GEOMETRIC_IDS = tuple(range(len(GEOMETRIC)))


def resize_weights(sizes: torch.Tensor, out: int, width: int, bicubic: torch.Tensor) -> torch.Tensor:
    """Antialiased resize as a matrix per image: (N, out, width) weights that take ``sizes[i]`` input pixels
    (the rest of ``width`` is padding) to ``out``, with torch's (Pillow's) filters and tap windows."""
    scale = (sizes.float() / out).view(-1, 1, 1)
    j = torch.arange(out, device=sizes.device, dtype=torch.float32).view(1, -1, 1)
    k = torch.arange(width, device=sizes.device, dtype=torch.float32).view(1, 1, -1)
    bicubic = bicubic.view(-1, 1, 1)
    support = torch.where(bicubic, 2.0, 1.0) * scale.clamp(min=1)
    center = scale * (j + 0.5)
    lo = (center - support + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support + 0.5).trunc(), sizes.float().view(-1, 1, 1))
    x = ((k - center + 0.5) / scale.clamp(min=1)).abs()
    linear = (1 - x).clamp(min=0)
    a = -0.5  # torch's and Pillow's antialiasing bicubic
    cubic = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    w = torch.where(bicubic, cubic, linear) * ((k >= lo) & (k < hi))
    return w / w.sum(-1, keepdim=True)


class HostParams:
    """Per-micro-batch numbers worked out on the host, sent to the device in one copy (pinned and
    non-blocking on CUDA) and read there as views."""

    def __init__(self) -> None:
        self.parts: dict[str, np.ndarray] = {}

    def add(self, name: str, values: Any) -> None:
        self.parts[name] = np.asarray(values, dtype=np.float64)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        flat = torch.from_numpy(np.concatenate([p.ravel() for p in self.parts.values()]) if self.parts else np.zeros(0))
        on_device = to_device(flat, device)
        out, at = {}, 0
        for name, p in self.parts.items():
            out[name] = on_device[at:at + p.size].view(p.shape)
            at += p.size
        return out


class TrainDraws:
    """Worker side: bytes -> (payload bytes, draws), making ``TrainCrop``'s draws in its order."""

    def __init__(self, size: int, auto_augment_policy: str | None, interpolation: str, hflip: float = 0.5) -> None:
        self.crop = transforms.TrainCrop(size, None, interpolation, hflip=hflip)
        self.randaugment = RandAugmentDraws(auto_augment_policy, size, interpolation) if auto_augment_policy else None
        for fn in self.randaugment.functions if self.randaugment else ():
            if fn not in DEVICE_OPS:
                raise RecipeError(f"data.decode: gpu has no device version of RandAugment's {fn.__name__} "
                                  "(augment.auto_augment); use data.decode: cpu")

    def __call__(self, data: bytes) -> tuple[bytes, torch.Tensor]:
        header = transforms.jpeg_size(data)
        if header is None or EOI not in data[-4096:]:  # not a plain, whole JPEG: Pillow decodes it (or raises) here
            pixels = np.array(transforms.open_rgb(data))
            kind, (height, width), data = PIXELS, pixels.shape[:2], pixels.transpose(2, 0, 1).tobytes()
        else:
            kind, (height, width) = JPEG, header
        top, left, h, w, mode = self.crop.box(height, width)
        flip = bool(torch.rand(1) < self.crop.hflip)
        ops: list[float] = []
        if self.randaugment is not None:
            for fn, level, kwargs in self.randaugment():
                ops += [DEVICE_OPS.index(fn), float(level[0]) if level else 0.0,
                        fn in GEOMETRIC and kwargs["resample"] == Image.Resampling.BICUBIC]
            ops += [-1, 0, 0] * (self.randaugment.layers - len(ops) // 3)
        draws = [kind, height, width, top, left, h, w, mode == "bicubic", flip, *ops]
        return data, torch.tensor(draws, dtype=torch.float64)


class DeviceCrop:
    """Device side: a micro-batch of ``TrainDraws`` outputs -> uint8 NHWC images on ``device``."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.fill = torch.tensor(randaugment.randaugment_params(size, "random")["img_mean"], dtype=torch.float32,
                                 device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: Any) -> Any:
        (payloads, draws), targets, ids, corrupt = batch
        with record_function("decode"):
            images = self.decode(payloads, draws)
        good = [k for k, img in enumerate(images) if img is not None]
        if not good:
            raise DataError(f"a whole micro-batch failed to decode on {self.device} (sample ids {ids.tolist()})")
        source = list(range(len(images)))
        if len(good) < len(images):  # copies only then: the loader's tensors stay pinned for their copies
            draws, targets, ids, corrupt = draws.clone(), targets.clone(), ids.clone(), corrupt.clone()
        for k in set(source) - set(good):  # as the reader: the good image before it, or the first
            g = max((j for j in good if j < k), default=good[0])
            log.warning("sample %d did not decode on %s: replaced by sample %d", int(ids[k]), self.device, int(ids[g]))
            source[k], draws[k], targets[k], ids[k], corrupt[k] = g, draws[g], targets[g], ids[g], 1
        out = self.apply(images, source, draws.numpy())
        return out.permute(0, 2, 3, 1), targets, ids, corrupt

    def decode(self, payloads: tuple[bytes, ...], draws: torch.Tensor) -> list[torch.Tensor | None]:
        """Every image as uint8 CHW on the device (None where it does not decode): the JPEGs in one batched
        call, the worker-decoded pixels in one copy."""
        kinds = draws[:, 0].tolist()
        images: list[torch.Tensor | None] = [None] * len(payloads)
        pixels = [k for k, kind in enumerate(kinds) if kind == PIXELS]
        if pixels:
            host = torch.frombuffer(bytearray(b"".join(payloads[k] for k in pixels)), dtype=torch.uint8)
            on_device = to_device(host, self.device)
            at = 0
            for k in pixels:
                h, w = int(draws[k, 1]), int(draws[k, 2])
                images[k] = on_device[at:at + 3 * h * w].view(3, h, w)
                at += 3 * h * w
        jpegs = [k for k, kind in enumerate(kinds) if kind == JPEG]
        data = [torch.frombuffer(bytearray(payloads[k]), dtype=torch.uint8) for k in jpegs]
        for k, img in zip(jpegs, self._decode_jpegs(data), strict=True):
            images[k] = img
        return images

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not data:
            return []
        if self.stream is None:
            return self._decode_all(data)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):  # outputs come from this stream's pool (see the module's docstring)
            decoded = self._decode_all(data)
        current.wait_stream(self.stream)
        for img in decoded:
            if img is not None:
                img.record_stream(current)
        return decoded

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the batch: find it
            return [self._decode_one(d) for d in data]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def apply(self, images: list[torch.Tensor | None], source: list[int], draws: np.ndarray) -> torch.Tensor:
        """Crop, resize, flip and the recorded RandAugment ops, in the CPU path's order: uint8 NCHW.
        ``source[k]`` is the decoded image sample k uses (itself, or the one that replaced it)."""
        chunks = self._chunks(images, source, draws)
        parts = [self._crop_resize(images, source, draws, chunk) for chunk in chunks]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        params = HostParams()
        params.add("flip", draws[:, 8])
        steps = self._plan_randaugment(draws, params)
        p = params.to(self.device)
        out = torch.where(_per_image(p["flip"]) > 0, out.flip(-1), out)
        for key, kind, bicubic in steps:
            idx = p[f"{key}/idx"].long()
            sub = out.index_select(0, idx)
            if kind < 0:
                sub = _warp(sub, p[f"{key}/matrix"], bicubic, self.fill)
            else:
                sub = COLOUR_OPS[DEVICE_OPS[kind]](sub, p[f"{key}/level"])
            out = out.index_copy(0, idx, sub)
        return out

    def _plan_randaugment(self, draws: np.ndarray, params: HostParams) -> list[tuple[str, int, bool]]:
        """On the host, slot by slot in the order applied: which images take which op, with their levels or
        matrices, as (key, op id or -1 for a warp, bicubic). The geometric ops of one slot and interpolation
        share one warp, each image with its own matrix."""
        steps = []
        for s, col in enumerate(range(HEAD, draws.shape[1], 3)):
            ops, levels, bicubic = draws[:, col].astype(int), draws[:, col + 1], draws[:, col + 2] > 0
            for cubic in (False, True):
                idx = np.nonzero(np.isin(ops, _GEOMETRIC_IDS) & (bicubic == cubic))[0]
                if len(idx):
                    key = f"{s}/warp/{cubic}"
                    params.add(f"{key}/idx", idx)
                    params.add(f"{key}/matrix", [_pillow_matrix(DEVICE_OPS[ops[i]], levels[i], self.size, self.size)
                                                 for i in idx])
                    steps.append((key, -1, cubic))
            for kind in sorted(set(ops[ops >= len(GEOMETRIC)].tolist())):
                idx = np.nonzero(ops == kind)[0]
                key = f"{s}/{kind}"
                params.add(f"{key}/idx", idx)
                params.add(f"{key}/level", levels[idx])
                steps.append((key, kind, False))
        return steps

    def _chunks(self, images: list[torch.Tensor | None], source: list[int], draws: np.ndarray) -> list[list[int]]:
        """Consecutive samples whose padded crops (and decoded sources) fit ``BUDGET`` together: one for
        ImageNet-sized micro-batches."""
        chunks: list[list[int]] = [[]]
        hc = wc = pixels = 0
        for k in range(len(source)):
            h, w = int(draws[k, 5]), int(draws[k, 6])
            img = images[source[k]]
            assert img is not None
            n_hc, n_wc, n_pixels = max(hc, h), max(wc, w), pixels + img.numel()
            if chunks[-1] and (3 * (len(chunks[-1]) + 1) * n_hc * n_wc > BUDGET or n_pixels > BUDGET):
                chunks.append([])
                n_hc, n_wc, n_pixels = h, w, img.numel()
            chunks[-1].append(k)
            hc, wc, pixels = n_hc, n_wc, n_pixels
        return chunks

    def _crop_resize(self, images: list[torch.Tensor | None], source: list[int], draws: np.ndarray,
                     chunk: list[int]) -> torch.Tensor:
        """The crops of ``chunk`` resized to ``size`` (antialiased, float), rounded: uint8 NCHW.

        The decoded images are packed into one flat buffer; each crop row is a window of it (``unfold``), so
        one ``index_select`` cuts every crop into a zero-padded batch, and the resize is two batched matrix
        products with per-image weights (``resize_weights``)."""
        d = draws[chunk]
        hc, wc = int(d[:, 5].max()), int(d[:, 6].max())
        used = sorted({source[k] for k in chunk})
        with record_function("decode"):  # packing the decoder's outputs into one buffer
            tensors = [images[u] for u in used]
            flat = torch.cat([t.reshape(-1) for t in tensors if t is not None] + [tensors[0].new_zeros(wc)])
        offsets, at = {}, 0
        for u, t in zip(used, tensors, strict=True):
            assert t is not None
            offsets[u] = at
            at += t.numel()
        params = HostParams()
        params.add("base", [offsets[source[k]] for k in chunk])
        geometry = d[:, 1:8].copy()  # height, width (the decoded tensor's, which the strides follow), top, left, h, w, bicubic
        geometry[:, :2] = [tuple(images[source[k]].shape[1:]) for k in chunk]  # type: ignore[union-attr]
        params.add("geometry", geometry)
        p = params.to(self.device)
        g = p["geometry"]
        height, width, top, left, h, w = (g[:, i].long().view(-1, 1, 1) for i in range(6))
        bicubic = g[:, 6] > 0
        rows = torch.minimum(torch.arange(hc, device=self.device).view(1, 1, -1), h - 1)
        channel = torch.arange(3, device=self.device).view(1, 3, 1)
        start = p["base"].long().view(-1, 1, 1) + channel * height * width + (top + rows) * width + left
        crops = flat.unfold(0, wc, 1).index_select(0, start.reshape(-1)).view(len(chunk), 3, hc, wc).float()
        wy = resize_weights(g[:, 4], self.size, hc, bicubic)
        wx = resize_weights(g[:, 5], self.size, wc, bicubic)
        out = wy[:, None] @ crops @ wx.transpose(1, 2)[:, None]
        return out.round_().clamp_(0, 255).to(torch.uint8)
