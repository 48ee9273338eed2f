"""Image files: bit depths, gray/colour/alpha, the official gray decoding, and errors that name the file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from kbnet.imageio import Image, ImageReadError, list_images, read_image, to_integer, write_image


@pytest.fixture
def photo() -> np.ndarray:
    return data.astronaut()[::8, ::8].astype(np.float32) / 255


@pytest.mark.parametrize("suffix, depth, tolerance", [(".png", 8, 0.5 / 255), (".png", 16, 0.5 / 65535),
                                                     (".tif", 16, 0.5 / 65535), (".tiff", 8, 0.5 / 255)])
def test_round_trip_keeps_bit_depth(photo, tmp_path, suffix, depth, tolerance):
    path = write_image(tmp_path / f"x{suffix}", Image(photo, bit_depth=depth))
    image = read_image(path)
    assert image.bit_depth == depth
    assert image.pixels.shape == photo.shape
    assert np.abs(image.pixels - photo).max() <= tolerance + 1e-7


def test_alpha_is_kept_apart_and_written_back(photo, tmp_path):
    alpha = np.linspace(0, 1, photo.shape[0] * photo.shape[1], dtype=np.float32).reshape(*photo.shape[:2], 1)
    image = read_image(write_image(tmp_path / "a.png", Image(photo, alpha=alpha)))
    assert image.pixels.shape[2] == 3
    assert np.abs(image.alpha - alpha).max() <= 0.5 / 255 + 1e-7


def test_rgb_order(tmp_path):
    red = np.zeros((4, 4, 3), np.float32)
    red[..., 0] = 1
    path = write_image(tmp_path / "red.png", red)
    assert cv2.imread(str(path))[0, 0].tolist() == [0, 0, 255]
    assert read_image(path).pixels[0, 0].tolist() == [1, 0, 0]


def test_gray_reading_equals_opencv_grayscale_decoding(tmp_path):
    """Official gray benchmarks read colour files with cv2.IMREAD_GRAYSCALE; so do we, value for value."""
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), data.chelsea()[:, :, ::-1])
    gray = read_image(path, channels=1).pixels
    assert gray.shape[2] == 1
    np.testing.assert_array_equal(to_integer(gray[:, :, 0]), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def test_gray_file_to_colour(tmp_path):
    path = write_image(tmp_path / "g.png", np.full((3, 5, 1), 0.5, np.float32))
    assert read_image(path, channels=3).pixels.shape == (3, 5, 3)


def test_refuses_to_overwrite(photo, tmp_path):
    path = write_image(tmp_path / "x.png", photo)
    with pytest.raises(FileExistsError, match="x.png"):
        write_image(path, photo)
    write_image(path, photo, overwrite=True)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported output format"):
        write_image(tmp_path / "x.gif", np.zeros((2, 2, 3), np.float32))
