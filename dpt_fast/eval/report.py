"""`report.json` and `report.md` of a run directory, from whatever stage outputs exist.

Called by the stage driver after every finished stage, so a run that has only finished stage 1 gets a partial
report and a finished run a full one. Reads (all optional):

    stage1/metrics.json            pseudo_label_accuracy, test_top1, seconds, ...
    stage2/metrics.json            fid, is, precision, recall, cas (class agreement), cas_per_class,
                                   classification_accuracy_score(_real), images_per_second, seconds, ...
    stage2/train_history.json      {"step": [...], "loss": [...], "lr": [...]}
    stage3/metrics.json            top1, stage1_top1, seconds, ...
    samples.png

and writes report.json (all metrics, per-stage timings, config summary, environment) and report.md (summary
tables and the PNGs beside it: samples.png, train_loss.png, top1.png, cas_per_class.png). A missing or
unreadable optional input is skipped with a warning; writing the report never stops the pipeline.

report.json is written last and records what the report was made from (`sources`, given by the stage driver:
the config and each stage's ledger) and the sha256 of report.md and of the plots, so `report_is_current` tells
a report that is up to date from one that a kill, a re-run stage or a damaged file has left stale.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils import UserError, atomic_path, file_sha256, human_seconds, log, read_json, write_json, write_text

LOSS_PNG, TOP1_PNG, CAS_PNG = "train_loss.png", "top1.png", "cas_per_class.png"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_optional_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (with a warning for the latter)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except UserError as e:
        log.warning("report: skipping %s", e)
        return None


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _history(path: Path) -> dict[str, list[float]] | None:
    h = _read_optional_json(path)
    if not isinstance(h, dict) or not isinstance(h.get("step"), list) or not isinstance(h.get("loss"), list):
        if h is not None:
            log.warning("report: %s has no 'step' and 'loss' lists; no loss curve", path)
        return None
    n = min(len(h["step"]), len(h["loss"]))
    if n == 0:
        return None
    out = {"step": h["step"][:n], "loss": h["loss"][:n]}
    if isinstance(h.get("lr"), list) and len(h["lr"]) >= n:
        out["lr"] = h["lr"][:n]
    return out


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def summarize(stages: dict[int, dict]) -> dict[str, float | None]:
    """The headline numbers of the three stages (None where a stage has not run or did not record it)."""
    m1, m2, m3 = stages.get(1, {}), stages.get(2, {}), stages.get(3, {})
    s1_top1 = _number(m3.get("stage1_top1"))
    if s1_top1 is None:
        s1_top1 = _number(m1.get("test_top1"))
    s3_top1 = _number(m3.get("top1"))
    return {
        "pseudo_label_accuracy": _number(m1.get("pseudo_label_accuracy")),
        "stage1_top1": s1_top1,
        "stage3_top1": s3_top1,
        "top1_gain": s3_top1 - s1_top1 if s1_top1 is not None and s3_top1 is not None else None,
        "fid": _number(m2.get("fid")),
        "is": _number(m2.get("is")),
        "precision": _number(m2.get("precision")),
        "recall": _number(m2.get("recall")),
        "cas": _number(m2.get("cas")),
        "classification_accuracy_score": _number(m2.get("classification_accuracy_score")),
        "classification_accuracy_score_real": _number(m2.get("classification_accuracy_score_real")),
        "images_per_second": _number(m2.get("images_per_second")),
    }


def config_summary(cfg) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "data": cfg.data.name,
        "labels_per_class": cfg.split.labels_per_class if cfg.split.fraction <= 0 else None,
        "label_fraction": cfg.split.fraction if cfg.split.fraction > 0 else None,
        "split_seed": cfg.split.seed,
        "seed": cfg.seed,
        "device": cfg.device,
        "num_threads": cfg.num_threads,
        "stage1_method": cfg.stage1.method,
        "model_preset": cfg.model.preset,
        "train_steps": cfg.train.steps,
        "train_batch_size": cfg.train.batch_size,
        "sample_steps": cfg.sample.steps,
        "sample_algorithm": cfg.sample.algorithm,
        "cfg_scale": cfg.sample.cfg_scale,
        "k_per_class": cfg.gen.k_per_class,
        "feature_net": cfg.eval.feature_net or f"shipped:{cfg.data.name}",
    }


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment(stages: dict[int, dict]) -> dict[str, Any]:
    """Software and hardware of this process, plus every backend the stages recorded (keys named *backend*)."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_fidelity": _version("torch-fidelity"),
        "dpt_fast": _version("dpt_fast"),
    }
    backends = {}
    for n, m in sorted(stages.items()):
        for k, v in m.items():
            if "backend" in k and isinstance(v, (str, int, float, bool, dict)):
                backends[f"stage{n}.{k}"] = v
    env["backends"] = backends
    return env


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, no global backend switch)
# ----------------------------------------------------------------------------------------------
def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_loss(history: dict[str, list[float]], path: Path) -> None:
    """Training loss per step (raw and smoothed) with the learning rate on a second axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    step, loss = history["step"], history["loss"]
    ax.plot(step, loss, color="tab:blue", alpha=0.35, lw=0.8, label="loss")
    if len(loss) >= 10:  # exponential moving average, for the trend
        ema, a, sm = [], 2.0 / (min(50, max(2, len(loss) // 20)) + 1), loss[0]
        for v in loss:
            sm = a * v + (1 - a) * sm
            ema.append(sm)
        ax.plot(step, ema, color="tab:blue", lw=1.6, label="loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if "lr" in history:
        ax2 = ax.twinx()
        ax2.plot(step, history["lr"], color="tab:orange", lw=1.0)
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("stage 2: diffusion training")
    _save_figure(fig, path)


def plot_top1(summary: dict[str, float | None], path: Path) -> None:
    """Bars: pseudo-label accuracy, stage-1 top-1, stage-3 top-1 (those that exist)."""
    from matplotlib.figure import Figure

    items = [("pseudo-labels\n(train)", summary["pseudo_label_accuracy"], "tab:gray"),
             ("stage 1\ntop-1 (test)", summary["stage1_top1"], "tab:blue"),
             ("stage 3\ntop-1 (test)", summary["stage3_top1"], "tab:green")]
    items = [it for it in items if it[1] is not None]
    fig = Figure(figsize=(4.8, 3.6))
    ax = fig.add_subplot()
    bars = ax.bar([i[0] for i in items], [i[1] for i in items], color=[i[2] for i in items])
    for b, (_, v, _) in zip(bars, items):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    title = "accuracy"
    if summary["top1_gain"] is not None:
        title += f" (stage 3 - stage 1: {summary['top1_gain']:+.3f})"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def plot_cas(cas_per_class: list, cas: float | None, path: Path, classes: list[str] | None = None) -> None:
    """Bars: per-class `cas` (class agreement: share of the images generated for a class that the judge assigns
    to it; not the literature's classification accuracy score)."""
    from matplotlib.figure import Figure

    vals = [v if _number(v) is not None else 0.0 for v in cas_per_class]
    names = classes if classes and len(classes) == len(vals) else [str(i) for i in range(len(vals))]
    fig = Figure(figsize=(max(4.8, 0.35 * len(vals) + 1.5), 3.6))
    ax = fig.add_subplot()
    ax.bar(names, vals, color="tab:purple")
    if cas is not None:
        ax.axhline(cas, color="k", ls="--", lw=1, label=f"all classes {cas:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("class agreement (cas)")
    ax.set_title("stage 2: share of generated images our feature net puts in their class", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def _try_plot(fn: Callable[..., None], *args) -> bool:
    """Run a plot; a failure costs the plot, not the pipeline."""
    try:
        fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 - the report is best-effort by design
        log.warning("report: could not draw %s (%s: %s)", args[-1], type(e).__name__, e)
        return False


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def _markdown(cfg, rd, summary: dict, stages: dict[int, dict], env: dict, pngs: list[tuple[str, str]]) -> str:
    done = sorted(stages)
    missing = [n for n in (1, 2, 3) if n not in stages]
    lines = [f"# DPT run `{cfg.name}`", ""]
    lab = f"{cfg.split.labels_per_class} label(s) per class" if cfg.split.fraction <= 0 else f"{cfg.split.fraction:.1%} labelled"
    lines += [f"Data **{cfg.data.name}**, {lab} (split seed {cfg.split.seed}), seed {cfg.seed}. "
              f"Stages finished: {', '.join(map(str, done)) or 'none'}."]
    if missing:
        lines += ["", f"*Partial report*: stage {missing[0]} has not finished; run "
                      f"`python -m dpt_fast.stage --stage {missing[0]} --run-dir {rd.root}`."]
    fmt_gain = f"{summary['top1_gain']:+.4f}" if summary["top1_gain"] is not None else "–"
    pr = (f"{_fmt(summary['precision'])} / {_fmt(summary['recall'])}"
          if summary["precision"] is not None or summary["recall"] is not None else "–")
    lines += ["", "## Results", "", "| metric | value |", "|---|---|",
              f"| stage-1 pseudo-label accuracy (train) | {_fmt(summary['pseudo_label_accuracy'])} |",
              f"| stage-1 top-1 (test) | {_fmt(summary['stage1_top1'])} |",
              f"| stage-3 top-1 (test) | {_fmt(summary['stage3_top1'])} |",
              f"| gain (stage 3 - stage 1) | {fmt_gain} |",
              f"| FID (feature net) | {_fmt(summary['fid'], 3)} |",
              f"| IS | {_fmt(summary['is'], 3)} |",
              f"| precision / recall | {pr} |",
              f"| class agreement `cas` (share of generated images our feature net puts in their class) | {_fmt(summary['cas'])} |",
              f"| classification accuracy score (literature CAS: trained on generated, tested on real) / "
              f"same classifier on as many real images | {_fmt(summary['classification_accuracy_score'])} / "
              f"{_fmt(summary['classification_accuracy_score_real'])} |",
              f"| generation images/s | {_fmt(summary['images_per_second'], 1)} |"]
    lines += ["", "## Time per stage", "", "| stage | seconds | |", "|---|---|---|"]
    total = 0.0
    for n in done:
        s = _number(stages[n].get("seconds"))
        total += s or 0.0
        lines.append(f"| {n} | {_fmt(s, 1)} | {human_seconds(s) if s is not None else ''} |")
    lines.append(f"| total | {total:.1f} | {human_seconds(total)} |")
    for title, name in pngs:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    lines += ["", "## All recorded metrics", ""]
    for n in done:
        scal = {k: v for k, v in stages[n].items() if k != "fingerprint" and isinstance(v, (int, float, str, bool))}
        lines += [f"**stage {n}**: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in sorted(scal.items())), ""]
    lines += ["## Environment", "", ", ".join(f"{k}: {_fmt(v)}" for k, v in env.items() if k != "backends" and v is not None)]
    if env["backends"]:
        lines += ["", "Backends: " + ", ".join(f"{k} = {v}" for k, v in env["backends"].items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def write_report(cfg, rd, stages: dict[int, dict] | None = None, sources: dict | None = None) -> dict:
    """Write report.json and report.md (+ plots) into the run directory `rd` (a RunDir); return report.json's dict.

    stages: {stage: metrics} of the finished stages (default: every stageN/metrics.json there is); sources:
    what the report is made from, stored for `report_is_current`. Works with any subset of stages finished;
    never raises for missing or malformed optional inputs.
    """
    if stages is None:
        stages = {}
        for n in (1, 2, 3):
            m = _read_optional_json(rd.metrics(n))
            if isinstance(m, dict):
                stages[n] = m
    summary = summarize(stages)
    env = environment(stages)

    pngs: list[tuple[str, str]] = []
    if rd.samples_png.is_file():
        pngs.append(("Generated samples (one row per class)", rd.samples_png.name))
    history = _history(rd.stage(2) / "train_history.json")
    if history is not None and _try_plot(plot_loss, history, rd.root / LOSS_PNG):
        pngs.append(("Stage-2 training loss", LOSS_PNG))
    if any(summary[k] is not None for k in ("pseudo_label_accuracy", "stage1_top1", "stage3_top1")):
        if _try_plot(plot_top1, summary, rd.root / TOP1_PNG):
            pngs.append(("Accuracy: stage 1 vs stage 3", TOP1_PNG))
    cas_pc = stages.get(2, {}).get("cas_per_class")
    if isinstance(cas_pc, list) and cas_pc:
        if _try_plot(plot_cas, cas_pc, summary["cas"], rd.root / CAS_PNG):
            pngs.append(("Per-class class agreement (`cas`, our feature net)", CAS_PNG))

    timings = {f"stage{n}": _number(m.get("seconds")) for n, m in stages.items()}
    timings["total"] = sum(v for v in timings.values() if v is not None)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stages_finished": sorted(stages),
        "summary": summary,
        "timings_seconds": timings,
        "stages": {str(n): m for n, m in sorted(stages.items())},
        "config": config_summary(cfg),
        "config_full": cfg.to_dict(),
        "environment": env,
        "plots": [name for _, name in pngs],
        "sources": sources,
    }
    write_text(rd.report_md, _markdown(cfg, rd, summary, stages, env, pngs))
    report["files"] = {p.name: file_sha256(p) for p in [rd.report_md] + [rd.root / name for _, name in pngs]}
    write_json(rd.report_json, report)  # last: a report.json names a complete report
    log.info("report: %s (stages %s)", rd.report_md, ", ".join(map(str, sorted(stages))) or "none")
    return report


def report_is_current(rd, sources: dict) -> bool:
    """True when report.json was made from `sources` and report.md and its plots are the files it wrote."""
    report = _read_optional_json(rd.report_json)
    if not isinstance(report, dict) or report.get("sources") != sources or not isinstance(report.get("files"), dict):
        return False
    try:
        return all(file_sha256(rd.root / name) == sha for name, sha in report["files"].items())
    except OSError:
        return False
