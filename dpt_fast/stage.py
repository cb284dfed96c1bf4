"""`python -m dpt_fast.stage` — the thin CLI over the three DPT stages.

    python -m dpt_fast.stage --stage {1,2,3,all} [--config PRESET|FILE.yaml] [--run-dir DIR]
                             [--fresh] [--quiet] [key=value ...]

Stage 1: semi-supervised learner -> pseudo-labels.  Stage 2: conditional U-ViT on pseudo-labels -> K images
per class.  Stage 3: retrain the classifier on real labelled + generated images.  Re-running a stage resumes
it; `--fresh` starts it over.  Under `torchrun --nproc_per_node N` the same command trains and samples on N
processes.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .config import END_OF_CONFIG, PRESETS, Config, load_config, missing_keys
from .utils import UserError, log, read_text, read_yaml, setup_logging, write_error


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dpt_fast.stage",
        description="Dual Pseudo Training: run one stage or all three.",
        epilog=f"presets: {', '.join(PRESETS)}. Overrides: key=value, e.g. seed=1 train.steps=500 split.labels_per_class=2",
    )
    p.add_argument("--stage", required=True, choices=["1", "2", "3", "all"], help="which stage to run")
    p.add_argument("--config", default=None, help="a preset name or a YAML file (default: the run dir's config.yaml, else mnist5k)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--fresh", action="store_true", help="discard the outputs of the stages being run and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run directory for this invocation.

    Without --config, a run directory that already holds a config.yaml continues with that config (plus
    the given overrides), so `--stage 2` after `--stage 1 seed=3` needs no repeated `seed=3`. That file is
    the full config the tool wrote: one that lacks keys (cut short) or is gone from a directory with stage
    outputs is an error, never a silent fall-back to a preset's defaults.
    """
    if args.config is None and args.run_dir is not None and (Path(args.run_dir) / "config.yaml").is_file():
        cfg = _run_config(Path(args.run_dir) / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        saved = Path(args.run_dir or f"runs/{cfg.name}") / "config.yaml"
        if args.config is None and saved.is_file():
            cfg = _run_config(saved, args.overrides)
        elif args.config is None and any(saved.parent.glob("stage[123]/outputs.json")):
            raise UserError(f"{saved} is missing but {saved.parent} holds stage outputs: pass --config PRESET|FILE "
                            "(and the overrides) the run was made with, to write it again")
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    return cfg, run_dir


def _run_config(path: Path, overrides: list[str]) -> Config:
    """A run directory's config.yaml (+ overrides), which the tool writes whole, ending with END_OF_CONFIG: a
    file without that line and without some keys was cut short (edited values are fine)."""
    fix = "pass --config PRESET|FILE (and the overrides) the run was made with, to write it again"
    missing = missing_keys(read_yaml(path, fix) or {})
    if missing and not read_text(path).endswith(END_OF_CONFIG):
        raise UserError(f"{path} is incomplete (no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: "
                        f"damaged or cut short); {fix}")
    return load_config(str(path), overrides)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(args.quiet)
    # Over the file-size limit (ulimit -f) a write fails with EFBIG instead of killing the process; SIGTERM (a
    # scheduler, torchrun) unwinds like Ctrl-C, so no temporary file is left.
    handlers = {sig: signal.signal(sig, h) for sig, h in ((signal.SIGXFSZ, signal.SIG_IGN), (signal.SIGTERM, _interrupt))}
    try:
        return _main(args)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _main(args: argparse.Namespace) -> int:
    from .distributed import report_failure, shutdown

    try:
        cfg, run_dir = resolve(args)
        from .stages import run_stages  # heavy imports only after the arguments are known to be good

        stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
        t0 = time.time()
        run_stages(cfg, run_dir, stages, fresh=args.fresh, progress=not args.quiet)
        log.info("done in %.1f s; report: %s", time.time() - t0, run_dir / "report.md")
        shutdown()
        return 0
    except (UserError, OSError) as e:
        err = e if isinstance(e, UserError) else write_error(e, getattr(e, "filename", None) or "a file")
        if err is None:  # an OSError the user cannot fix by freeing space or permissions: a bug, with its traceback
            report_failure(f"{type(e).__name__}: {e}")
            raise
        print(f"error: {err}", file=sys.stderr)
        report_failure(str(err))
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        report_failure("interrupted")
        return 130
    except Exception as e:
        report_failure(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
