"""Train the small feature network that judges generated images (FID, precision/recall, IS, CAS).

    python scripts/train_feature_net.py --data mnist5k --out dpt_fast/assets/mnist5k_feature_net.safetensors
    python scripts/train_feature_net.py --data digits  --out dpt_fast/assets/digits_feature_net.safetensors

Trains on all labels of the embedded train split only (the test split is only measured), on CPU, seeded,
with deterministic algorithms and a fixed thread count, so the same command gives the same file on the
same torch build. Writes OUT (safetensors, architecture in its header) and OUT with .json (architecture,
train/test accuracy, sha256 of the weights, CPU seconds, the exact command).
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, choices=["mnist5k", "digits"])
    p.add_argument("--out", required=True, help="output .safetensors (a .json is written beside it)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="channels of the conv stages")
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of what makes the result reproducible)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from dpt_fast.config import DataConfig
    from dpt_fast.data import load_dataset
    from dpt_fast.eval.feature_nets import accuracy, arch_kwargs, save_feature_net, train_feature_net
    from dpt_fast.utils import setup_logging, write_json

    setup_logging(args.quiet)
    ds = load_dataset(DataConfig(name=args.data))
    cpu0, wall0 = time.process_time(), time.time()
    net = train_feature_net(
        ds.x_train, ds.y_train, widths=tuple(args.widths), feature_dim=args.feature_dim, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.quiet,
    )
    cpu_s, wall_s = time.process_time() - cpu0, time.time() - wall0
    out = Path(args.out)
    sha = save_feature_net(net, out)
    meta = {
        "data": args.data,
        "arch": arch_kwargs(net),
        "train_accuracy": accuracy(net, ds.x_train, ds.y_train),
        "test_accuracy": accuracy(net, ds.x_test, ds.y_test),
        "num_train": int(len(ds.x_train)),
        "num_test": int(len(ds.x_test)),
        "sha256": sha,
        "params": int(sum(t.numel() for t in net.parameters())),
        "train_cpu_seconds": round(cpu_s, 1),
        "train_wall_seconds": round(wall_s, 1),
        "command": "python scripts/train_feature_net.py " + shlex.join(argv),
        "hparams": {k: v for k, v in vars(args).items() if k not in ("data", "out", "quiet")},
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    write_json(out.with_suffix(".json"), meta)
    print(f"{out}: train acc {meta['train_accuracy']:.4f}, test acc {meta['test_accuracy']:.4f}, "
          f"{cpu_s:.1f} CPU-s, sha256 {sha[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
