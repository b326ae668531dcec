"""The LUT backend (target ``lut``): T-MAC-style table-lookup kernels for 1–4-bit weights.

``weights`` turns integer codes into bit-plane table indices in a kernel's layout, ``model``
is the kernels' arithmetic in numpy (bit-exact), ``codegen`` writes the C (AVX-512 ``vpermb``
and ``vpshufb``, AVX2 ``vpshufb``, portable), ``build`` compiles and caches it and calls it
through ctypes.
"""
from __future__ import annotations
