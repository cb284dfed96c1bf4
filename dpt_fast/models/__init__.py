"""Models: the U-ViT diffusion backbone (+ adaLN variant), the official-checkpoint imports (U-ViT, MSN)."""
from .msn import load_msn
from .official import load_official_uvit
from .uvit import UVIT_PRESETS, UViT, build_uvit

__all__ = ["UVIT_PRESETS", "UViT", "build_uvit", "load_msn", "load_official_uvit"]
