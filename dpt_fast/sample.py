"""`python -m dpt_fast.sample` — N samples from a finished stage-2 run, e.g. the 50,000 of FID-50K.

    python -m dpt_fast.sample --run-dir runs/X --num 50000 --labels uniform|pseudo --out DIR
                              [--seed S] [--quiet] [key=value ...]
    torchrun --nproc_per_node 8 -m dpt_fast.sample ...      (rank r makes shards r, r + 8, ...)

The model is the EMA of the run's checkpoint at train.steps, the sampler the run's `sample.*` (for the
imagenet256_uvit_* presets the official one). Labels are drawn i.i.d. as the official scripts draw them:
`uniform` over the classes (ImageNet), or `pseudo` in proportion to the stage-1 pseudo-label counts (DPT's
CIFAR-10 sampler). DIR gets the shards of stage2/generated (uint8 images, labels, per-class index;
`dpt_fast.sampling.load_generated` reads them) and `sample.json` (what was drawn, from which run). A killed
run resumes with the same command; a larger --num keeps the samples of a smaller one.

Only the sampling keys can change: `sample.*`, `gen.batch_size`, `gen.shard_size`, `device`, `num_threads`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_config, parse_override
from .utils import UserError, log, setup_logging, write_json

# Keys that do not change the trained model or what it was trained on.
_SAMPLING_KEYS = ("gen.batch_size", "gen.shard_size", "device", "num_threads")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpt_fast.sample", description="Samples from a finished stage-2 run.")
    p.add_argument("--run-dir", required=True, help="a run directory whose stage 2 has finished")
    p.add_argument("--num", type=int, required=True, help="number of samples (50000 for FID-50K)")
    p.add_argument("--labels", required=True, choices=["uniform", "pseudo"],
                   help="uniform over the classes, or in proportion to the stage-1 pseudo-labels")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json + sample.json)")
    p.add_argument("--seed", type=int, default=None, help="label and noise seed (default: the run's seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sampler overrides, e.g. sample.steps=25")
    return p.parse_args(argv)


def _check_override(item: str) -> None:
    (section, rest), = parse_override(item).items()
    key = section if not isinstance(rest, dict) else f"{section}.{next(iter(rest))}"
    if section != "sample" and key not in _SAMPLING_KEYS:
        raise UserError(f"'{item}': {key} is part of the trained run; only sample.*, {', '.join(_SAMPLING_KEYS)} "
                        "can change when sampling it")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(args.quiet)
    try:
        from .stages.rundir import RunDir
        from .stages.stage2 import sample_run
        from .distributed import is_main

        rd = RunDir(args.run_dir)
        for item in args.overrides:
            _check_override(item)
        cfg = load_config(str(rd.require(rd.config, 2)), args.overrides)
        summary = sample_run(cfg, rd, args.num, args.labels, args.out, seed=args.seed, progress=not args.quiet)
        if is_main():
            write_json(Path(args.out) / "sample.json", {k: summary[k] for k in (
                "run_dir", "step", "images", "labels", "seed", "classes_drawn", "max_per_class", "nfe")})
            log.info("%d samples of %s (step %d, %s labels) in %s; %.1f img/s", summary["images"], rd.root,
                     summary["step"], args.labels, args.out, summary["images_per_second"])
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
