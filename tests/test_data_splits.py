"""DPT/MSN-style subset lists (`1imgs_class.txt`) and the split selection by config."""
import numpy as np
import pytest

from dpt_fast.config import SplitConfig
from dpt_fast.data import labelled_indices, read_subset_file, select_labelled, write_subset_file
from dpt_fast.utils import UserError

FILES = [f"n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(5)]  # ImageNet-style names


def test_msn_style_list_of_bare_file_names_is_read_by_name(tmp_path):
    # as in facebookresearch/msn imagenet_subsets1/1imgs_class.txt: one file name per line, no folder
    (tmp_path / "1imgs_class.txt").write_text("n02_3.JPEG\nn00_1.JPEG\n\n# a comment\nn01_4.JPEG\n")
    assert read_subset_file(tmp_path / "1imgs_class.txt", FILES).tolist() == [1, 9, 13]


def test_relative_paths_are_accepted_too(tmp_path):
    (tmp_path / "s.txt").write_text("n01/n01_0.JPEG\n")
    assert read_subset_file(tmp_path / "s.txt", FILES).tolist() == [5]


def test_write_then_read_roundtrips_the_indices(tmp_path):
    y = np.repeat(np.arange(3), 5)
    idx = labelled_indices(y, labels_per_class=2, seed=3)
    write_subset_file(tmp_path / "2imgs_class.txt", FILES, idx)
    lines = (tmp_path / "2imgs_class.txt").read_text().splitlines()
    assert len(lines) == 6 and all("/" not in line for line in lines)  # bare names, MSN/DPT style
    assert np.array_equal(read_subset_file(tmp_path / "2imgs_class.txt", FILES), idx)


def test_duplicate_basenames_are_written_as_paths_and_must_be_read_as_paths(tmp_path):
    files = ["a/0.png", "b/0.png", "b/1.png"]
    write_subset_file(tmp_path / "s.txt", files, [1, 2])
    assert (tmp_path / "s.txt").read_text() == "b/0.png\nb/1.png\n"
    assert read_subset_file(tmp_path / "s.txt", files).tolist() == [1, 2]
    (tmp_path / "t.txt").write_text("0.png\n")
    with pytest.raises(UserError, match="t.txt:1: 0.png matches several files"):
        read_subset_file(tmp_path / "t.txt", files)


def test_unknown_or_skipped_names_are_errors_with_the_line(tmp_path):
    (tmp_path / "s.txt").write_text("n00_0.JPEG\nn00_9.JPEG\n")
    with pytest.raises(UserError, match="s.txt:2: n00_9.JPEG: no such file in the data set"):
        read_subset_file(tmp_path / "s.txt", FILES)
    with pytest.raises(UserError, match="skipped as a bad image"):
        read_subset_file(tmp_path / "s.txt", FILES, skipped=["n00/n00_9.JPEG"])
    with pytest.raises(UserError, match="no such file"):
        read_subset_file(tmp_path / "nope.txt", FILES)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="lists no file"):
        read_subset_file(tmp_path / "empty.txt", FILES)


def test_select_labelled_uses_the_subset_file_or_the_seeded_split(tmp_path):
    y = np.repeat(np.arange(3), 5)
    (tmp_path / "s.txt").write_text("n01_2.JPEG\n")
    assert select_labelled(SplitConfig(subset_file=str(tmp_path / "s.txt")), y, FILES).tolist() == [7]
    cfg = SplitConfig(labels_per_class=2, seed=1)
    assert np.array_equal(select_labelled(cfg, y), labelled_indices(y, 2, 0.0, 1))
    with pytest.raises(UserError, match="has no file names"):
        select_labelled(SplitConfig(subset_file="s.txt"), y)


def test_percentage_split_is_seeded_and_stratified():
    y = np.repeat(np.arange(4), 200)
    a = select_labelled(SplitConfig(fraction=0.05, seed=0), y)
    assert np.bincount(y[a]).tolist() == [10] * 4
    assert np.array_equal(a, select_labelled(SplitConfig(fraction=0.05, seed=0), y))
    assert not np.array_equal(a, select_labelled(SplitConfig(fraction=0.05, seed=1), y))
