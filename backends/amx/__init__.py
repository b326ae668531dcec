"""The sparse backend (target ``amx``): SparAMX-style sparse weights and kernels.

``format`` builds the layout (VNNI-ordered rows, bitmasks, packed non-zeros, per-tile
offsets) from bf16 or int8 weights; ``csrc/sparamx.cc`` holds the AVX-512 sparse and dense
kernels and the AMX kernels (hardware tiles and an SDM emulation from the same source);
``build`` compiles them and calls them through ctypes.
"""
from __future__ import annotations
