"""The three DPT stages as plain functions, and the driver that chains them over a run directory."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..config import END_OF_CONFIG, Config, dump_yaml, load_config
from ..distributed import rank_world, report_failure, run_on_rank0, setup_distributed
from ..ssl import METHODS as LEARNER_METHODS
from ..utils import UserError, log, read_json, remove_stale_temp_files, resolve_device, write_json, write_text
from .rundir import RunDir

# The config sections each stage's outputs depend on (cumulative: a stage depends on those before it). The
# caches inside a stage key on exactly the fields they read (stage1.ssl_fingerprint / umap_fingerprint,
# stage2.train_fingerprint, the generation manifest's identity); tests/test_cache_keys.py holds the table.
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
    """Run `stages` (e.g. [1, 2, 3]) in order; finished stages with the same config and intact outputs are reused.

    Returns {stage: metrics}. Raises UserError (one line) when a prerequisite stage is missing, was made with
    another config or is damaged, and when another process holds the run directory. Under torchrun every rank
    calls this; rank 0 holds the lock and does all the bookkeeping (config, ledgers, report) while the others
    wait, and a failure on any rank ends every rank (`dpt_fast.distributed`).
    """
    rd = RunDir(run_dir)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    setup_distributed(resolve_device(cfg.device))  # under torchrun: one process group for the whole run
    try:
        if rank_world()[0] != 0:
            return _run(cfg, rd, stages, fresh, progress)
        with rd.lock():
            return _run(cfg, rd, stages, fresh, progress)
    except Exception as e:
        report_failure(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        raise


def _run(cfg: Config, rd: RunDir, stages: list[int], fresh: bool, progress: bool) -> dict:
    run_on_rank0(_start, cfg, rd, stages[0], fresh)
    out: dict[int, dict] = {}
    for n in stages:
        fp = fingerprint(cfg, n)
        done = run_on_rank0(_reusable, rd, n, fp)
        if done is not None:
            log.info("stage %d: already finished with this config, reusing %s (--fresh to redo)", n, rd.metrics(n))
            out[n] = done
            continue
        log.info("stage %d: running in %s", n, rd.stage(n))
        t0 = time.time()
        metrics = _stage_fn(n)(cfg, rd, progress=progress)
        metrics.setdefault("seconds", time.time() - t0)
        metrics["fingerprint"] = fp
        run_on_rank0(_finish, cfg, rd, n, metrics)
        out[n] = metrics
    run_on_rank0(_refresh_report, cfg, rd)
    return out


def _start(cfg: Config, rd: RunDir, first: int, fresh: bool) -> None:
    """Rank 0, under the lock: remove dead writers' temporary files, check the stages before `first`, apply
    --fresh, save the config."""
    removed = remove_stale_temp_files(rd.root)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), rd.root)
    for k in range(first - 1, 0, -1):  # the nearest unfinished stage first (it names its own prerequisites)
        state = rd.check(k, fingerprint(cfg, k))
        if not state.ok:
            raise UserError(f"{rd.stage(k)}: stage {k} {state.problem}; run "
                            f"`python -m dpt_fast.stage --stage {k} --run-dir {rd.root}` first")
    if fresh:
        for n in range(first, 4):
            rd.clear(n)
        log.info("--fresh: cleared stage %d%s outputs in %s", first, "" if first == 3 else "+", rd.root)
    _save_config(cfg, rd)


def _save_config(cfg: Config, rd: RunDir) -> None:
    """Write config.yaml unless it already holds this config (runtime keys such as device aside)."""
    if rd.config.is_file():
        try:
            if load_config(str(rd.config)).identity() == cfg.identity():
                return
        except UserError:
            pass  # unreadable or invalid: replaced below
    write_text(rd.config, dump_yaml(cfg) + END_OF_CONFIG)


def _reusable(rd: RunDir, n: int, fp: str) -> dict | None:
    """Rank 0: stage n's metrics when it finished with this config and every output checks out; otherwise
    None, after deleting the damaged outputs so that the re-run rebuilds them (and only them)."""
    state = rd.check(n, fp)
    if state.ok:
        return state.metrics
    if state.damaged:
        log.warning("stage %d: %s; re-running stage %d to rebuild it", n, state.problem, n)
        for p in state.damaged:
            p.unlink(missing_ok=True)
        rd.ledger(n).unlink(missing_ok=True)
    return None


def _finish(cfg: Config, rd: RunDir, n: int, metrics: dict) -> None:
    """Rank 0: stage n's metrics, then its ledger (the proof it finished), then the report."""
    write_json(rd.metrics(n), metrics)
    rd.record(n, fingerprint(cfg, n))
    _write_report(cfg, rd)


def _finished_metrics(cfg: Config, rd: RunDir) -> dict[int, dict]:
    """Metrics of the stages whose ledger names this config (what the report shows)."""
    out = {}
    for n in (1, 2, 3):
        led = rd.read_ledger(n)
        if led is not None and led.get("fingerprint") == fingerprint(cfg, n):
            try:
                m = read_json(rd.metrics(n))
            except UserError:
                continue
            if isinstance(m, dict):
                out[n] = m
    return out


def _report_sources(cfg: Config, rd: RunDir) -> dict:
    """What the report is made from: the config and each stage's ledger (a report with other sources is stale)."""
    ident = hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:16]
    return {"config": ident, **{f"stage{n}": rd.ledger_digest(n) for n in (1, 2, 3)}}


def _write_report(cfg: Config, rd: RunDir) -> None:
    from ..eval.report import write_report

    write_report(cfg, rd, stages=_finished_metrics(cfg, rd), sources=_report_sources(cfg, rd))


def _refresh_report(cfg: Config, rd: RunDir) -> None:
    """Rank 0: rewrite the report when it is missing, damaged or made from other outputs (e.g. a kill after a
    stage's ledger and before its report)."""
    from ..eval.report import report_is_current

    if not report_is_current(rd, _report_sources(cfg, rd)):
        log.info("report: %s is not up to date; rewriting it", rd.report_md)
        _write_report(cfg, rd)
