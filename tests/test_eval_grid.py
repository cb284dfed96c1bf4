import numpy as np
import pytest
from PIL import Image

from dpt_fast.eval import save_grid
from dpt_fast.eval.grid import make_grid
from dpt_fast.utils import UserError


def test_grid_has_one_row_per_class_with_that_class_images_upscaled():
    # image i of class c is filled with value 10*c + i, so every cell can be traced back
    labels = np.repeat(np.arange(3), 4)
    images = np.stack([np.full((1, 8, 8), 10 * c + i, np.uint8) for c in range(3) for i in range(4)])
    g = make_grid(images, labels, per_class=3, pad=2)
    cell = 8 * 8 + 2  # 8x8 upscaled x8 to 64 px, plus the separator
    assert g.shape == (3 * cell + 2, 3 * cell + 2, 1)
    for c in range(3):
        for j in range(3):
            block = g[2 + c * cell : 2 + c * cell + 64, 2 + j * cell : 2 + j * cell + 64]
            assert (block == 10 * c + j).all()


def test_missing_class_leaves_a_blank_row_and_rgb_is_kept():
    images = np.zeros((2, 3, 28, 28), np.uint8)
    g = make_grid(images, np.array([0, 2]), per_class=2, num_classes=4)
    cell = 28 * 3 + 2
    assert g.shape == (4 * cell + 2, 2 * cell + 2, 3)
    assert (g[2 + cell : 2 + cell + 84, 2:86] == 255).all()  # class 1: no image, blank
    assert (g[2:86, 2:86] == 0).all()


def test_save_grid_writes_a_png_atomically(tmp_path):
    path = tmp_path / "samples.png"
    save_grid(np.full((20, 1, 8, 8), 200, np.uint8), np.arange(20) % 10, path, per_class=2)
    img = Image.open(path)
    assert img.size == (2 * 66 + 2, 10 * 66 + 2) and img.mode == "L"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_bad_images_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="uint8"):
        save_grid(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), tmp_path / "x.png")
    with pytest.raises(UserError, match="labels"):
        save_grid(np.zeros((2, 1, 8, 8), np.uint8), np.zeros(3, np.int64), tmp_path / "x.png")
