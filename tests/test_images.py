import numpy as np
import pytest
from PIL import Image

from ldmflow.data import images
from tests import helpers


def rgb(decoded: images.Decoded) -> np.ndarray:
    return np.asarray(decoded.image)


def test_exact_size_png_keeps_pixels():
    source = helpers.pattern(16, 16)
    decoded = images.preprocess(helpers.encode(Image.fromarray(source)), 16)
    np.testing.assert_array_equal(rgb(decoded), source)
    assert (decoded.width, decoded.height, decoded.mode, decoded.format) == (16, 16, "RGB", "PNG")


def test_resize_short_side_then_centre_crop():
    decoded = images.preprocess(helpers.png(64, 32), 16)
    assert decoded.image.size == (16, 16)
    assert (decoded.width, decoded.height) == (64, 32)


def test_exif_orientation_is_applied():
    # Landscape 32x16 with red top-left; orientation 6 means "rotate 90° clockwise to view".
    decoded = images.preprocess(helpers.jpeg_with_orientation(32, 16, 6), 16)
    assert (decoded.width, decoded.height) == (16, 32)  # the viewed image is portrait
    upright = images.preprocess(helpers.jpeg_with_orientation(32, 16, 1), 16)
    # After rotating clockwise, the red quadrant moves to the top-right.
    pixels = rgb(decoded).astype(int)
    assert pixels[2, -3, 0] > 200 and pixels[2, -3, 1] < 60
    assert rgb(upright).astype(int)[2, 2, 0] > 200


@pytest.mark.parametrize(
    "data, expected",
    [
        (helpers.rgba_transparent(), (255, 255, 255)),  # alpha composited on white
        (helpers.palette_with_transparency(), (255, 255, 255)),
        (helpers.gray16(value=65535), (255, 255, 255)),  # 16-bit scaled, not clipped
        (helpers.gray16(value=32896), (128, 128, 128)),
        (helpers.animated_gif(), (255, 255, 255)),  # first frame
    ],
    ids=["rgba", "palette-transparent", "gray16-white", "gray16-mid", "animated-gif"],
)
def test_modes_convert_to_rgb(data, expected):
    decoded = images.preprocess(data, 8)
    assert decoded.image.mode == "RGB"
    assert tuple(int(v) for v in rgb(decoded)[4, 4]) == expected


def test_cmyk_and_one_bit_and_float():
    cmyk = images.preprocess(helpers.cmyk_jpeg(), 8)
    r, g, b = (int(v) for v in rgb(cmyk)[4, 4])
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert images.to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert images.to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert images.to_rgb(Image.fromarray(np.full((4, 4), 200, dtype=np.int32))).getpixel((0, 0)) == (200, 200, 200)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a caption, not a picture", "not an image"),
        (helpers.truncated_png(), "truncated or corrupt"),
        (helpers.bomb_png(), "decompression bomb"),
    ],
    ids=["empty", "not-an-image", "truncated", "bomb"],
)
def test_unusable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(images.Rejected, match=reason):
        images.preprocess(data, 16, max_pixels=50_000_000)


def test_min_size():
    with pytest.raises(images.Rejected, match="too small: 8x8"):
        images.preprocess(helpers.png(8, 8), 16, min_size=10)
    assert images.preprocess(helpers.png(8, 8), 16, min_size=0).image.size == (16, 16)


def test_encode_is_deterministic_and_lossless_for_png():
    image = Image.fromarray(helpers.pattern(16, 16))
    assert images.encode(image, "png") == images.encode(image, "png")
    np.testing.assert_array_equal(images.decode_rgb(images.encode(image, "png")), np.asarray(image))
    assert images.decode_rgb(images.encode(image, "jpg")).shape == (16, 16, 3)
