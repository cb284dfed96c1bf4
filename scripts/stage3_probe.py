"""Where can stage 3 gain? Refit classifiers of a finished run (simclr_umap stage 1) with and without its
generated images and print test top-1 for each (the README's "where stage 3 gains" numbers):

- logistic regression in stage 1's UMAP space (what stage 3 does), for several C;
- logistic regression on the raw SimCLR features (a data-starved linear probe);
- a semi-supervised UMAP refitted with the generated images as labelled points (target_weight 0.5).

    python scripts/stage3_probe.py runs/s0
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from dpt_fast.config import load_config
from dpt_fast.data import load_dataset, load_split
from dpt_fast.models.classifier import fit_logreg, knn_embed, load_space
from dpt_fast.sampling import load_generated
from dpt_fast.stages.stage1 import exact_knn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    a = p.parse_args()
    rd = a.run_dir
    cfg = load_config(str(rd / "config.yaml"))
    ds = load_dataset(cfg.data, progress=False)
    space = load_space(rd / "stage1", torch.device("cpu"))
    if space.kind != "simclr_umap":
        raise SystemExit(f"{rd}: stage1.method={space.kind}; this probe needs simclr_umap")
    gx, gy = load_generated(rd / "stage2" / "generated")
    lab = np.sort(load_split(rd / "split.json"))
    ylab, yt = ds.y_train[lab], ds.y_test
    k = int(ds.y_train.max()) + 1

    def top1(head, x) -> float:
        return float((head.label_prob(x)[0] == yt).mean())

    def both(xl, xg, xt, c):
        h1 = fit_logreg(xl, ylab, c, k)
        h3 = fit_logreg(np.concatenate([xl, xg]), np.concatenate([ylab, gy]), c, k)
        return top1(h1, xt), top1(h3, xt)

    u_gen, u_test = space.embed(gx), space.embed(ds.x_test)
    f_gen, f_test = space.features(gx), space.features(ds.x_test)
    for c in (0.1, 1.0, 10.0):
        print("UMAP space, C=%-4g  labelled only %.3f  + generated %.3f" % (c, *both(space.train_coords[lab], u_gen, u_test, c)))
    for c in (1.0, 10.0):
        print("SimCLR features, C=%-4g  labelled only %.3f  + generated %.3f" % (c, *both(space.train_feats[lab], f_gen, f_test, c)))

    import umap

    s1 = cfg.stage1
    feats = np.concatenate([space.train_feats, f_gen])
    y = np.full(len(feats), -1)
    y[lab] = ylab
    y[len(space.train_feats):] = gy
    reducer = umap.UMAP(n_components=s1.umap_dim, n_neighbors=s1.umap_neighbors, min_dist=s1.umap_min_dist,
                        n_epochs=s1.umap_epochs, random_state=cfg.seed,
                        precomputed_knn=exact_knn(feats, s1.umap_neighbors), target_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = reducer.fit_transform(feats, y=y)
    known = np.flatnonzero(y >= 0)
    head = fit_logreg(coords[known], y[known], 1.0, k)
    print("semi-supervised UMAP with the generated images as labelled points: %.3f"
          % top1(head, knn_embed(f_test, feats, coords, s1.knn_transform)))


if __name__ == "__main__":
    main()
