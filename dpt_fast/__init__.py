"""dpt_fast: Dual Pseudo Training (You et al., NeurIPS 2023), fast and faithful.

Stage 1 (semi-supervised learner -> pseudo-labels), stage 2 (class-conditional U-ViT on pseudo-labels ->
K generated images per class), stage 3 (classifier retrained on real labelled + generated images).
Run `python -m dpt_fast.stage --stage all`.
"""
__version__ = "0.1.0"
