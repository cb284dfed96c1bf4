"""Triton kernels, installed as `dpt_fast.kernels`. Each kernel file holds its PyTorch reference beside it.

Importing this package does not import triton; each kernel module does, and the dispatch in
`dpt_fast.ops` decides whether a kernel may run (CUDA, or TRITON_INTERPRET=1 on CPU).
"""
