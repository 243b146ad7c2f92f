"""Uniform quantizers and exact bit packing shared by every lowbit method."""

from lowbit.quant.packing import pack, unpack, packed_size
from lowbit.quant.uniform import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quantize,
)

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize",
    "fake_quantize",
    "pack",
    "packed_size",
    "quantize",
    "unpack",
]
