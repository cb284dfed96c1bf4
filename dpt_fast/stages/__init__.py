"""The three DPT stages as plain functions, and the driver that chains them over a run directory."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..config import Config, dump_yaml
from ..ssl import METHODS as LEARNER_METHODS
from ..utils import UserError, log, write_json, write_text
from .rundir import RunDir

# The config sections each stage's outputs depend on (cumulative: a stage depends on those before it).
SECTIONS: dict[int, tuple[str, ...]] = {
    1: ("data", "split", "stage1"),
    2: ("data", "split", "stage1", "model", "diffusion", "train", "sample", "gen", "eval"),
    3: ("data", "split", "stage1", "model", "diffusion", "train", "sample", "gen", "eval", "stage3"),
}


def fingerprint(cfg: Config, stage: int) -> str:
    """A hash of the config sections stage `stage`'s outputs depend on. The end-to-end learners
    (stage1.method=freematch | fixmatch) read stage1.method and the `learner` section, not the other stage1 keys."""
    if cfg.stage1.method not in LEARNER_METHODS:
        return cfg.fingerprint(*SECTIONS[stage])
    d = cfg.to_dict()
    sub = {"seed": d["seed"], **{s: d[s] for s in SECTIONS[stage]}}
    sub["stage1"] = {"method": cfg.stage1.method}
    if cfg.learner.init:  # it starts from stage 1's SimCLR encoder (and SimCLR-UMAP classifier)
        keys = [k for k in d["stage1"] if k.startswith("ssl_") or k in ("width", "feature_dim", "logreg_c")]
        if cfg.learner.init == "simclr_umap":
            keys += [k for k in d["stage1"] if k.startswith("umap_") or k == "knn_transform"]
        sub["stage1"].update({k: d["stage1"][k] for k in keys})
    sub["learner"] = d["learner"]
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def _stage_fn(n: int):
    if n == 1:
        from .stage1 import run
    elif n == 2:
        from .stage2 import run
    else:
        from .stage3 import run
    return run


def run_stages(cfg: Config, run_dir: str | Path, stages: list[int], fresh: bool = False, progress: bool = True) -> dict:
    """Run `stages` (e.g. [1, 2, 3]) in order; finished stages with the same config are reused.

    Returns {stage: metrics}. Raises UserError (one line) when a prerequisite stage is missing or was made
    with another config.
    """
    rd = RunDir(run_dir)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    first = stages[0]
    if first > 1 and rd.finished(first - 1, fingerprint(cfg, first - 1)) is None:
        path = rd.metrics(first - 1)
        why = "is missing" if not path.exists() else "was made with a different config"
        raise UserError(f"{path} {why}: run `python -m dpt_fast.stage --stage {first - 1} --run-dir {rd.root}` first")
    if fresh:
        for n in range(first, 4):
            rd.clear(n)
        log.info("--fresh: cleared stage %d%s outputs in %s", first, "" if first == 3 else "+", rd.root)
    write_text(rd.config, dump_yaml(cfg))

    out: dict[int, dict] = {}
    for n in stages:
        fp = fingerprint(cfg, n)
        done = rd.finished(n, fp)
        if done is not None:
            log.info("stage %d: already finished with this config, reusing %s (--fresh to redo)", n, rd.metrics(n))
            out[n] = done
            continue
        log.info("stage %d: running in %s", n, rd.stage(n))
        t0 = time.time()
        metrics = _stage_fn(n)(cfg, rd, progress=progress)
        metrics.setdefault("seconds", time.time() - t0)
        metrics["fingerprint"] = fp
        write_json(rd.metrics(n), metrics)
        out[n] = metrics
        from ..eval.report import write_report

        write_report(cfg, rd)
    return out
