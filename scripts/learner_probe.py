"""Stage 1 and stage 3 of an end-to-end learner (stage1.method=freematch | fixmatch) with a fixed set of
generated images: how the learner alone compares with the learner + generated images, per split seed, and what
it costs in CPU seconds. This is how the embedded default's learner was chosen (docs/LEARNER.md).

    python scripts/learner_probe.py NAME --generated runs/base/stage2/generated --seeds 0 1 2 \
        [--config mnist5k] [key=value ...]

For each split seed S it runs stage 1 (split.seed=S) in runs/probe/NAME/sS, links the given generated images in
as that run's stage-2 output, runs stage 3, and appends one JSON line per seed to runs/probe/results.jsonl:
name, overrides, split seed, stage-1 pseudo-label accuracy and top-1, stage-3 top-1, CPU seconds of each stage.
The same images stand in for every seed's stage 2 (a stand-in: in a full run stage 2 learns from this learner's
own pseudo-labels). Run it with one thread (OMP_NUM_THREADS=1, num_threads=1) to compare CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dpt_fast.config import load_config  # noqa: E402
from dpt_fast.stages import stage1  # noqa: E402
from dpt_fast.stages.learner import run_stage3  # noqa: E402
from dpt_fast.stages.rundir import RunDir  # noqa: E402
from dpt_fast.utils import setup_logging, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--generated", required=True, help="a finished stage2/generated folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds")
    p.add_argument("--config", default="mnist5k")
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--encoder", default="", help="learner.init=simclr: start from this stage1/encoder.safetensors "
                   "(made with the same config) instead of training SimCLR in each run")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    setup_logging(args.quiet)
    gen = Path(args.generated).resolve()
    for s in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"split.seed={s}"])
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        rd = RunDir(Path(args.out) / args.name / f"s{s}")
        shutil.rmtree(rd.root, ignore_errors=True)
        rd.root.mkdir(parents=True)
        if args.encoder:
            rd.stage(1).mkdir()
            shutil.copy(args.encoder, rd.stage(1) / "encoder.safetensors")
        m1 = stage1.run(cfg, rd, progress=not args.quiet)
        write_json(rd.metrics(1), m1)
        rd.stage(2).mkdir(parents=True, exist_ok=True)
        os.symlink(gen, rd.generated)
        m3 = run_stage3(cfg, rd, progress=not args.quiet)
        write_json(rd.metrics(3), m3)
        row = {"name": args.name, "overrides": args.overrides, "config": args.config, "split_seed": s,
               "pseudo_label_accuracy": m1["pseudo_label_accuracy"], "stage1_top1": m1["test_top1"],
               "stage3_top1": m3["top1"], "generated_stage1_agreement": m3["generated_stage1_agreement"],
               "stage1_cpu_seconds": m1["cpu_seconds"], "stage3_cpu_seconds": m3["cpu_seconds"],
               "train_seconds": [m1["train"].get("train_seconds"), m3["train"].get("train_seconds")],
               "encoder_given": bool(args.encoder), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
        with open(Path(args.out) / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
