"""Python front of the fused ops: each op dispatches to a Triton / xformers / SDPA kernel or a PyTorch reference."""
from .attention import attention, attention_backend
from .fused import add_layer_norm, bias_gelu, kernels_mode, layer_norm

__all__ = ["add_layer_norm", "attention", "attention_backend", "bias_gelu", "kernels_mode", "layer_norm"]
