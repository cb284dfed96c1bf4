"""Labelled subsets of the training set: k per class or a fraction, seeded, saved as `split.json`; or a
DPT/MSN-style subset list (`1imgs_class.txt`: one image file name per line) read and written by name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..utils import UserError, read_json, read_text, write_json, write_text


def labelled_indices(y: np.ndarray, labels_per_class: int = 1, fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of the labelled training images.

    fraction > 0: that share of each class (at least one image per class); otherwise `labels_per_class`
    images of each class. Same (y, k, fraction, seed) -> same indices on every machine.
    """
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx)))) if fraction > 0 else labels_per_class
        if k > len(idx):
            raise UserError(f"split.labels_per_class={k} but class {c} has only {len(idx)} training images; lower it")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def save_split(path: str | os.PathLike, labelled: np.ndarray, num_train: int, **meta) -> None:
    write_json(path, {"labelled": [int(i) for i in labelled], "num_train": int(num_train), **meta})


def load_split(path: str | os.PathLike, num_train: int | None = None) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; run --stage 1 first")
    fix = "re-run --stage 1 (it rewrites the split)"
    d = read_json(path, fix)
    lab = d.get("labelled") if isinstance(d, dict) else None
    if not isinstance(lab, list) or not lab or not all(isinstance(i, int) and not isinstance(i, bool) for i in lab):
        raise UserError(f"{path}: expected a JSON object with a non-empty 'labelled' list of integer indices; {fix}")
    idx = np.asarray(lab, dtype=np.int64)
    if idx.min() < 0 or len(np.unique(idx)) != len(idx):
        raise UserError(f"{path}: labelled indices must be distinct and >= 0; {fix}")
    if num_train is not None and idx.max() >= num_train:
        raise UserError(f"{path}: labelled indices do not fit a training set of {num_train} images; {fix}")
    return idx


# ----------------------------------------------------------------------------------------------
# Subset lists (MSN / DPT `imagenet_subsets*/Nimgs_class.txt`, SimCLR `1percent.txt`)
# ----------------------------------------------------------------------------------------------
def _basename(f: str) -> str:
    return f.rsplit("/", 1)[-1]


def read_subset_file(path: str | os.PathLike, files: Sequence[str], skipped: Sequence[str] = ()) -> np.ndarray:
    """Sorted int64 indices into `files` of the images a subset list names.

    A line is a file name (`n01440764_10026.JPEG`, as in the MSN/DPT lists) or a path relative to the data
    root (`n01440764/n01440764_10026.JPEG`); blank lines and `#` comments are ignored. `files` are the data
    set's relative paths (e.g. `ImageIndex.files`); `skipped` its bad files, for a pointed error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"split.subset_file={path}: no such file")
    by_rel = {f: i for i, f in enumerate(files)}
    by_base: dict[str, int] = {}
    ambiguous = set()
    for i, f in enumerate(files):
        b = _basename(f)
        if b in by_base:
            ambiguous.add(b)
        by_base[b] = i
    bad = {_basename(f) for f in skipped} | set(skipped)
    out = []
    for lineno, line in enumerate(read_text(path, "fix the list (one image file name per line)").splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in by_rel:
            out.append(by_rel[name])
            continue
        b = _basename(name)
        if b in ambiguous:
            raise UserError(f"{path}:{lineno}: {name} matches several files; write it as class_folder/{b}")
        if b not in by_base:
            why = "it was skipped as a bad image" if (name in bad or b in bad) else "no such file in the data set"
            raise UserError(f"{path}:{lineno}: {name}: {why}; fix the list or the data")
        out.append(by_base[b])
    if not out:
        raise UserError(f"{path}: lists no file; write one image file name per line")
    return np.unique(np.asarray(out, dtype=np.int64))


def write_subset_file(path: str | os.PathLike, files: Sequence[str], indices: Sequence[int] | np.ndarray) -> None:
    """Write the files at `indices` one per line: bare file names (MSN/DPT style) when those are unique in
    `files`, else paths relative to the root. `read_subset_file` reads either back to the same indices."""
    bases = [_basename(f) for f in files]
    unique = len(set(bases)) == len(bases)
    names = [bases[i] if unique else files[i] for i in np.asarray(indices, dtype=np.int64)]
    write_text(path, "".join(n + "\n" for n in names))


def select_labelled(split_cfg, y: np.ndarray, files: Sequence[str] | None = None, skipped: Sequence[str] = ()) -> np.ndarray:
    """The labelled training indices a `split` config asks for: its subset_file when set (needs the data
    set's file names), else `labelled_indices(y, labels_per_class, fraction, seed)`."""
    if split_cfg.subset_file:
        if files is None:
            raise UserError(
                f"split.subset_file={split_cfg.subset_file}: this data set has no file names; "
                "subset lists work with data.name=imagefolder or latents"
            )
        return read_subset_file(split_cfg.subset_file, files, skipped)
    return labelled_indices(y, split_cfg.labels_per_class, split_cfg.fraction, split_cfg.seed)
