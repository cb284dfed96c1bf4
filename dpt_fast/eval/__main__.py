"""`python -m dpt_fast.eval`: FID / sFID / IS / precision-recall / KID of generated images, as the paper reports.

    python -m dpt_fast.eval --samples DIR|NPZ|RUN_DIR --reference DIR|NPZ|STATS.npz \
        --inception-weights weights-inception-2015-12-05-6726825d.pth [--metrics fid,sfid,is,prc] [--json OUT]

See `dpt_fast.eval.adm` for the definitions (ADM's evaluator, through torch-fidelity). Bad input is one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..utils import UserError, setup_logging, write_json


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpt_fast.eval", description=__doc__.splitlines()[0])
    p.add_argument("--samples", required=True, help="generated images: an .npz (ADM's arr_0 or our images), a folder of "
                   "PNG/JPEG, a stage-2 generated/ folder or a run directory")
    p.add_argument("--reference", required=True, help="real images or their statistics: an ADM reference batch "
                   "(VIRTUAL_imagenet256_labeled.npz), an .npz of mu/sigma(/mu_s/sigma_s), or a folder")
    p.add_argument("--metrics", default="fid,sfid,is,prc", help="comma-separated subset of fid,sfid,is,kid,prc "
                   "(default: ADM's fid,sfid,is,prc)")
    p.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights "
                   "(weights-inception-2015-12-05-6726825d.pth); required, nothing is downloaded")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward pass (default 100)")
    p.add_argument("--cache-dir", default="", help="reference features cache (default ~/.cache/dpt_fast/eval); "
                   "'none' to disable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(args.quiet)
    try:
        from .adm import evaluate

        if args.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        out = evaluate(args.samples, args.reference, args.inception_weights, metrics, device=args.device,
                       batch_size=args.batch_size, cache_dir=None if args.cache_dir == "none" else args.cache_dir,
                       progress=not args.quiet)
        if args.json:
            write_json(args.json, out)
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
