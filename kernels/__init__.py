"""Triton kernels, imported as `dpt_fast.kernels` (dpt_fast/kernels is a tracked link to this folder). Each
kernel file holds its PyTorch reference beside it.

Importing this package does not import triton; each kernel module does, and the dispatch in
`dpt_fast.ops` decides whether a kernel may run (CUDA, or TRITON_INTERPRET=1 on CPU).
"""
