"""Models: the U-ViT diffusion backbone (+ adaLN variant) and the official-checkpoint import."""
from .uvit import UVIT_PRESETS, UViT, build_uvit

__all__ = ["UVIT_PRESETS", "UViT", "build_uvit"]
