"""Numeric formats, exact to the bit: integer (1–8 and 16 bits), plain fp16/bf16, minifloats
(FP8/FP6/FP4), OCP MX block formats, NVFP4, codebook formats (NF4, SF4, RaZeR, BitMoD);
quantize, dequantize, fake-quantize, bit-pack, and convert between them.

    >>> from qcompile import formats
    >>> fmt = formats.get("int4", group_size=128)
    >>> qt = fmt.quantize(w, axis=-1)          # QuantizedTensor: codes, scales, metadata
    >>> w_hat = fmt.dequantize(qt)
    >>> blob = qt.pack(); formats.QuantizedTensor.unpack(blob)

``axis`` is the axis along which elements share a scale (the reduction axis); see
``qcompile.formats.base`` for the conventions and ``qcompile.formats.packing`` for the byte
layout.
"""
from qcompile.formats import codebook, floats, integer, mx, nvfp4  # noqa: F401  (register)
from qcompile.formats.base import BlockLayout, Format, QuantizedTensor, ste
from qcompile.formats.codebook import CodebookFormat, SpecialValueFP4, quantile_codebook
from qcompile.formats.convert import requantize, slice_and_scale
from qcompile.formats.floats import ELEMENTS, Element, FloatStorage, MinifloatFormat, element
from qcompile.formats.integer import IntFormat
from qcompile.formats.mx import MXFormat
from qcompile.formats.nvfp4 import NVFP4Format
from qcompile.formats.packing import pack_bits, unpack_bits
from qcompile.formats.registry import available, from_json, get, register_format

__all__ = [
    "Format", "QuantizedTensor", "BlockLayout", "ste", "get", "from_json", "available",
    "register_format", "IntFormat", "FloatStorage", "MinifloatFormat", "MXFormat",
    "NVFP4Format", "CodebookFormat", "SpecialValueFP4", "Element", "ELEMENTS", "element",
    "quantile_codebook", "requantize", "slice_and_scale", "pack_bits", "unpack_bits",
]
