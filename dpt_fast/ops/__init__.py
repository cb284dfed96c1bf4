"""Python front of the fused ops: each op dispatches to a Triton / xformers / SDPA kernel or a PyTorch reference."""
from .attention import attention, attention_backend
from .fused import bias_gelu, layer_norm

__all__ = ["attention", "attention_backend", "bias_gelu", "layer_norm"]
