"""Image validation and preprocessing: bytes in, a square RGB image (or a reason) out.

Every raw input goes through :func:`preprocess`: decode with Pillow, refuse what cannot be
used with a reason a person can act on, apply the EXIF orientation, convert any mode to
8-bit RGB (alpha composited on white), resize the short side and centre-crop.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class Rejected(ValueError):
    """An input that cannot become a sample; the message is the reason recorded for it."""


@dataclass(frozen=True)
class Decoded:
    """A preprocessed image and what is known of the original."""

    image: Image.Image  # RGB, resolution × resolution
    width: int  # original size, after EXIF orientation
    height: int
    mode: str  # original Pillow mode
    format: str  # original file format, e.g. "PNG"


def preprocess(
    data: bytes,
    resolution: int,
    *,
    min_size: int = 0,
    max_pixels: int = 64_000_000,
    resample: str = "bicubic",
) -> Decoded:
    """Decode ``data`` and return it as a ``resolution``-pixel square RGB image.

    Raises :class:`Rejected` with the reason for an empty, truncated, unrecognised,
    oversized (decompression bomb) or too-small input.
    """
    if not data:
        raise Rejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise Rejected(f"decompression bomb: {width}x{height} is over the limit of {max_pixels} pixels")
            if min(width, height) < max(min_size, 1):
                raise Rejected(f"too small: {width}x{height}, the minimum side is {max(min_size, 1)}")
            fmt = image.format or "unknown"
            mode = image.mode
            if image.format == "JPEG" and mode in {"RGB", "L", "CMYK", "YCbCr"}:
                # Let libjpeg decode at a reduced scale (DCT scaling) when the output is
                # much smaller: the same pixels out of the resize, a fraction of the work.
                image.draft(image.mode, (resolution, resolution))
            image.load()
            image = ImageOps.exif_transpose(image)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise Rejected("not an image: Pillow does not recognise the format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise Rejected(f"truncated or corrupt image: {exc}") from exc
    if image.width != width or image.height != height:  # rotated by EXIF
        width, height = image.size
    rgb = to_rgb(image)
    return Decoded(resize_and_crop(rgb, resolution, resample), width, height, mode, fmt)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha composited on white, 16-bit and float scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth grayscale array into 0..255."""
    values = array.astype(np.float64)
    if mode == "F":
        peak = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        values = np.nan_to_num(values, nan=0.0) / peak * 255.0
    elif mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0  # 0..65535 → 0..255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def resize_and_crop(image: Image.Image, resolution: int, resample: str = "bicubic") -> Image.Image:
    """Resize so the short side is ``resolution``, then take the centred square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), RESAMPLE[resample], reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    if (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def encode(image: Image.Image, fmt: str, jpeg_quality: int = 95, png_compress_level: int = 1) -> bytes:
    """PNG or JPEG bytes of an RGB image; deterministic for the same pixels and settings."""
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpg":
        image.save(out, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """An encoded sample image as a ``(H, W, 3)`` uint8 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def image_to_model(image: Image.Image, resolution: int):
    """A PIL image as a model's (3, R, R) float32 input in [−1, 1]: any mode to RGB, short side
    resized, centre crop (what an edit or inpainting request's image becomes)."""
    import torch

    square = resize_and_crop(to_rgb(image), resolution)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_input(mask: Image.Image, resolution: int):
    """A PIL mask (white, i.e. ≥ 128: generate) as (1, R, R) of 0/1, cropped like the image."""
    import torch

    square = resize_and_crop(mask.convert("L"), resolution, resample="nearest")
    return torch.from_numpy((np.asarray(square) >= 128).astype(np.float32)).unsqueeze(0)
