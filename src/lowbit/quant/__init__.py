"""Primitives shared by every lowbit method: affine quantizers, exact bit packing, integer helpers, the KIVI format."""

from lowbit.quant.affine import QuantizedTensor, ZeroPoint, dequantize, fake_quantize, quantize, quantize_integer
from lowbit.quant.packing import PACKABLE_BITS, pack, packed_size, unpack

__all__ = [
    "PACKABLE_BITS",
    "QuantizedTensor",
    "ZeroPoint",
    "dequantize",
    "fake_quantize",
    "pack",
    "packed_size",
    "quantize",
    "quantize_integer",
    "unpack",
]
