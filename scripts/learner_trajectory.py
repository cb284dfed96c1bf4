"""Stage 1 of an end-to-end learner (stage1.method=freematch | fixmatch), followed: the test top-1 of its start
and of its EMA model every N iterations, per split seed. This is how the embedded default's learning rate was
chosen (docs/LEARNER.md: TorchSSL's 0.03 knocks the started network down, 0.01 does not).

    python scripts/learner_trajectory.py NAME --stage1-from runs/s0/stage1 --seeds 0 1 2 --every 25 \
        [--config mnist5k] [key=value ...]

`--stage1-from` names a finished stage-1 folder of the same config whose SimCLR encoder and UMAP coordinates
(`encoder.safetensors`, `space.json`, `space.npz`: they do not depend on the split) are copied in, so each seed
skips SimCLR. For each split seed it builds the learner's start (`learner.init`) as stage 1 does, trains it
(nothing is written into a run directory), and appends one JSON line to OUT/results.jsonl: name, overrides,
split seed, start train / test top-1, the EMA model's test top-1 every N iterations, final train / test top-1,
CPU seconds. Run it with one thread (OMP_NUM_THREADS=1, num_threads=1) to compare CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpt_fast.config import load_config  # noqa: E402
from dpt_fast.data import load_dataset, select_labelled  # noqa: E402
from dpt_fast.models.wrn import build_net  # noqa: E402
from dpt_fast.ssl.train import LearnerData, predict, train_learner  # noqa: E402
from dpt_fast.stages import learner  # noqa: E402
from dpt_fast.stages.rundir import RunDir  # noqa: E402
from dpt_fast.utils import setup_logging  # noqa: E402

SPACE_FILES = ("encoder.safetensors", "space.json", "space.npz")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--stage1-from", required=True, help="a finished stage1/ folder (its SimCLR encoder and UMAP)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds")
    p.add_argument("--every", type=int, default=25, help="test the EMA model every this many iterations")
    p.add_argument("--config", default="mnist5k")
    p.add_argument("--out", default="runs/trajectory")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    setup_logging(args.quiet)
    missing = [f for f in SPACE_FILES if not (Path(args.stage1_from) / f).is_file()]
    if missing:
        print(f"error: --stage1-from {args.stage1_from} lacks {', '.join(missing)}: name the stage1/ folder of a "
              "finished run of the same config (python -m dpt_fast.stage --stage 1)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"split.seed={s}"])
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        ds = load_dataset(cfg.data)
        y = ds.y_train
        labelled = select_labelled(cfg.split, y, None, None)
        norm = learner._norm(cfg, ds.x_train)
        x = torch.from_numpy(ds.x_train)
        data = LearnerData(x[torch.from_numpy(labelled)], torch.from_numpy(y[labelled]), x, labelled, ds.num_classes)

        def top1(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
            return float((predict(model, images, norm).argmax(1) == labels).mean())

        c0 = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            rd = RunDir(tmp)
            rd.stage(1).mkdir(parents=True)
            for f in SPACE_FILES:
                shutil.copy(Path(args.stage1_from) / f, rd.stage(1) / f)
            init, _ = learner._start(cfg, rd, ds, data, None, norm, not args.quiet, torch.device("cpu"))
            start = build_net(cfg.learner.net, int(x.shape[1]), ds.num_classes, cfg.learner.width,
                              cfg.learner.bn_momentum)
            if init is not None:
                start.load_state_dict(init, strict=False)
            row = {"name": args.name, "overrides": args.overrides, "config": args.config, "split_seed": s,
                   "start_train_top1": top1(start, ds.x_train, y), "start_test_top1": top1(start, ds.x_test, ds.y_test)}
            trajectory = []

            def follow(k: int, ema: torch.nn.Module) -> None:
                if k % args.every == 0:
                    trajectory.append([k, top1(ema, ds.x_test, ds.y_test)])

            model, _ = train_learner(data, cfg.learner, cfg.stage1.method, num_classes=ds.num_classes, norm=norm,
                                     seed=cfg.seed, ckpt_dir=Path(tmp) / "checkpoints", fingerprint="trajectory",
                                     progress=not args.quiet, on_iter=follow, init=init)
        row.update(trajectory=trajectory, final_train_top1=top1(model, ds.x_train, y),
                   final_test_top1=top1(model, ds.x_test, ds.y_test), cpu_seconds=time.process_time() - c0,
                   threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"))
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
