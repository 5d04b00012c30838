"""Fused ops for the PyTorch lowering, one folder each.

Every op has a pure-torch reference (`<op>/reference.py`, forward and backward by autograd) and
one public function that dispatches: a CUDA tensor with CuPy present runs the CuPy kernel
(`<op>/<op>.cu`, compiled by NVRTC at first use, through `cuda.py`), anything else runs the
reference. CuPy is imported lazily, never on CPU. `BERTRT_KERNELS=reference` (or
`cuda.use_kernels(False)`) runs the references on CUDA too. Attention has no kernel of its
own: torch's flash / memory-efficient SDPA, and its varlen flash path for the packed graph.
See docs/kernels.md.
"""

from bertrt.kernels.attention import attention, key_mask_bias, packed_attention, packed_layout
from bertrt.kernels.bias_gelu import bias_gelu
from bertrt.kernels.embed_layer_norm import embed_layer_norm
from bertrt.kernels.mlm_loss import mlm_loss
from bertrt.kernels.optim import adamw_step, lamb_step
from bertrt.kernels.skip_layer_norm import skip_layer_norm

__all__ = ["adamw_step", "attention", "bias_gelu", "embed_layer_norm", "key_mask_bias",
           "lamb_step", "mlm_loss", "packed_attention", "packed_layout", "skip_layer_norm"]
