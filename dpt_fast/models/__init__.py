"""Models: the U-ViT diffusion backbone (+ adaLN variant) and the official-checkpoint import."""
from .official import load_official_uvit
from .uvit import UVIT_PRESETS, UViT, build_uvit

__all__ = ["UVIT_PRESETS", "UViT", "build_uvit", "load_official_uvit"]
