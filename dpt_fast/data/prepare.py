"""`python -m dpt_fast.data.prepare`: an ImageFolder -> memory-mapped shards (VAE latents or images).

    python -m dpt_fast.data.prepare --root imagenet/train --out data/in256_latents --vae sd-vae-ft-ema
    torchrun --nproc_per_node 8 -m dpt_fast.data.prepare --root ... --out ... --vae ...   # shards split by rank

Re-running the same command resumes (finished shards are kept). Bad images are skipped and listed in the
manifest, or with --on-bad-image error stop the run with one line naming the file (exit 2). See
`dpt_fast.data.latents` for the output layout and how stage 2 reads it.
"""
from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta

import torch

from ..distributed import launched_by_torchrun, report_failure, setup_distributed
from ..utils import UserError, setup_logging


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpt_fast.data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="ImageFolder root: one sub-folder per class, JPEG/PNG files")
    p.add_argument("--out", required=True, help="output folder (shards, labels, manifest.json)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder or .safetensors/.ckpt file; omit to store images")
    p.add_argument("--resolution", type=int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--crop", choices=["adm", "center"], default="adm",
                   help="adm: ADM/U-ViT center_crop_arr, the official pixels (PIL, default); center: short-side "
                        "resize + centre crop (DALI on the GPU when installed, faster)")
    p.add_argument("--on-bad-image", choices=["skip", "error"], default="skip", help="skip and list bad files (default), or stop at the first")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=64, help="images per decode/encode batch (default 64)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of the latent moments (default float16)")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype the VAE encoder runs in (default float32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=0, help="processes for the image check (default: all cores)")
    p.add_argument("--fresh", action="store_true", help="discard what OUT holds and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(args.quiet)
    distributed = launched_by_torchrun()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over `ulimit -f` a write fails (one-line error), no kill
    try:
        device = args.device
        if distributed:
            want = torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
            # rank 0 checks every image before the others start: allow for a long first barrier
            device = str(setup_distributed(want, timeout=timedelta(hours=6))[2])
        from .latents import prepare_shards

        prepare_shards(
            args.root, args.out, vae_path=args.vae, resolution=args.resolution, crop=args.crop,
            on_bad_image=args.on_bad_image,
            shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype, vae_dtype=args.vae_dtype, device=device,
            workers=args.workers, fresh=args.fresh, progress=not args.quiet,
        )
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        report_failure(str(e))  # under torchrun: the other ranks stop too
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume (finished shards are kept)", file=sys.stderr)
        report_failure("interrupted")
        return 130
    except Exception as e:
        report_failure(f"{type(e).__name__}: {e}")
        raise
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
