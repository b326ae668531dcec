"""Bit packing of codes and the byte layout of a packed ``QuantizedTensor``.

**Bit streams** (``pack_bits`` / ``unpack_bits``). ``n`` codes of ``b`` bits each form one
little-endian bit stream: code ``i`` occupies stream bits ``[i·b, (i+1)·b)``, least
significant bit first, and stream bit ``k`` is bit ``k mod 8`` of byte ``k div 8``. So for
b = 4, code 0 is the low nibble of byte 0 and code 1 its high nibble (the ONNX
``MatMulNBits`` / GGML order); for b = 3 and 6, codes straddle bytes. The last byte is
zero-padded. Widths are 1 to 16 bits (b = 16: plain little-endian 16-bit words). Signed
codes are stored as their low ``b`` bits of two's complement and sign-extended on unpacking;
a section's dtype says which: ``int8`` and ``int16`` sections hold signed codes, ``uint8`` and
``int32`` ones (``uint16`` codes, see ``qcompile.formats.integer``) unsigned codes.

**Packed tensor** (``QuantizedTensor.pack``), all integers little-endian::

    offset 0   b"QCQT"                       magic
    offset 4   u8   version (1)
    offset 5   u8[3] zero
    offset 8   u32  header length H
    offset 12  H bytes of UTF-8 JSON: {"format": {...}, "shape": [...], "axis": ...,
               "dtype": "float32", "sections": [{"role": "codes" | <param role>,
               "shape": [...], "dtype": "uint8" | "int8" | "int16" | "int32" | "float16" | ...,
               "bits": b,
               "offset": o, "nbytes": m}, ...]}
    then each section at its offset (a multiple of 16 from the start of the buffer):
        codes in C order of the (padded) code shape, bit-packed at the element width;
        each parameter in C order: zero points and block metadata bit-packed at their
        width, scales as raw little-endian values of their dtype (E8M0 and E4M3 scale
        codes are one byte each).
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch

from qcompile.errors import QuantizationError

__all__ = ["pack_bits", "unpack_bits", "pack_tensor", "unpack_tensor", "MAGIC", "VERSION"]

MAGIC = b"QCQT"
VERSION = 1
_ALIGN = 16
_NP = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
       torch.float16: np.float16, torch.float32: np.float32, torch.int32: np.int32,
       torch.int64: np.int64}
MAX_BITS = 16
#: integer section dtypes that are bit-packed, with the widths they may hold; int8 and int16
#: hold signed codes, uint8 and int32 (16-bit unsigned codes) unsigned ones
_PACKED = {torch.uint8: (1, 8, False), torch.int8: (1, 8, True), torch.int16: (9, 16, True),
           torch.int32: (9, 16, False)}


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``codes`` (values below ``2**bits``) into a little-endian bit stream."""
    if not 1 <= bits <= MAX_BITS:
        raise QuantizationError(f"cannot bit-pack {bits}-bit codes; widths are 1 to {MAX_BITS}")
    a = np.asarray(codes).reshape(-1)
    mask = (1 << bits) - 1
    if a.size and (int(a.min()) < 0 or int(a.max()) > mask):
        raise QuantizationError(f"a code exceeds {bits} bits (range {int(a.min())}.."
                                f"{int(a.max())})", hint="pass unsigned codes below 2**bits")
    if bits > 8:
        w = np.ascontiguousarray(a, dtype="<u2")
        if bits == 16:
            return w.tobytes()
        planes = np.unpackbits(w.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
        return np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes()
    u = np.ascontiguousarray(a, dtype=np.uint8)
    if bits == 8:
        return u.tobytes()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte, a vectorised shift-or
        per = 8 // bits
        pad = (-u.size) % per
        v = np.concatenate([u, np.zeros(pad, np.uint8)]).reshape(-1, per)
        out = np.zeros(v.shape[0], np.uint8)
        for j in range(per):
            out |= v[:, j] << np.uint8(j * bits)
        return out.tobytes()
    planes = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` unsigned codes as ``uint8`` (``uint16`` for widths
    above 8)."""
    if not 1 <= bits <= MAX_BITS:
        raise QuantizationError(f"cannot unpack {bits}-bit codes; widths are 1 to {MAX_BITS}")
    need = math.ceil(count * bits / 8)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < need:
        raise QuantizationError(f"packed codes are truncated: {buf.size} bytes for {count} "
                                f"{bits}-bit codes (need {need})")
    buf = buf[:need]
    if bits > 8:
        if bits == 16:
            return np.frombuffer(buf.tobytes(), "<u2").astype(np.uint16)
        stream = np.unpackbits(buf, bitorder="little")[: count * bits].reshape(count, bits)
        planes = np.zeros((count, 16), np.uint8)
        planes[:, :bits] = stream
        return np.packbits(planes, axis=1, bitorder="little").view("<u2").reshape(-1) \
            .astype(np.uint16)
    if bits == 8:
        return buf.copy()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        v = (buf[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        return v.reshape(-1)[:count].copy()
    stream = np.unpackbits(buf, bitorder="little")[: count * bits].reshape(count, bits)
    return np.packbits(stream, axis=1, bitorder="little").reshape(-1)


def _to_unsigned(t: torch.Tensor, bits: int) -> np.ndarray:
    """The low ``bits`` of each code (two's complement for signed codes)."""
    a = t.detach().contiguous().numpy()
    if a.dtype == np.uint8:
        return a
    return (a.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint16 if bits > 8 else np.uint8)


def _sign_extend(u: np.ndarray, bits: int, dtype) -> np.ndarray:
    sign = 1 << (bits - 1)
    return ((u.astype(np.int64) ^ sign) - sign).astype(dtype)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _section(role: str, t: torch.Tensor, bits: int | None):
    """(header entry, payload) of one tensor: bit-packed when ``bits`` is given."""
    lo, hi, _signed = _PACKED.get(t.dtype, (0, -1, False))
    if bits is not None and lo <= bits <= hi:
        payload = pack_bits(_to_unsigned(t, bits), bits)
    else:
        bits = None
        if t.dtype == torch.bfloat16:
            payload = t.detach().contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            a = t.detach().contiguous().numpy()
            payload = a.astype(a.dtype.newbyteorder("<")).tobytes()
    return {"role": role, "shape": list(t.shape), "dtype": _dtype_name(t), "bits": bits}, payload


def pack_tensor(qt) -> bytes:
    f = qt.format
    entries = [_section("codes", qt.codes, f.bits if f.bits <= MAX_BITS else None)]
    for role, p in qt.params.items():
        pb = f.param_bits(role)
        entries.append(_section(role, p, pb if role in ("zero_point", "meta") else None))
    header = {"format": f.to_json(), "shape": list(qt.shape),
              "axis": list(qt.axis) if isinstance(qt.axis, tuple) else qt.axis,
              "dtype": _dtype_name(torch.empty(0, dtype=qt.dtype)), "sections": []}
    # offsets depend on the header length, which depends on the offsets: settle by iterating
    offsets = [0] * len(entries)
    for _ in range(4):
        header["sections"] = [dict(e, offset=o, nbytes=len(p))
                              for (e, p), o in zip(entries, offsets)]
        hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        pos = _align(12 + len(hb))
        new = []
        for _e, p in entries:
            new.append(pos)
            pos = _align(pos + len(p))
        if new == offsets:
            break
        offsets = new
    out = bytearray(pos)
    out[0:12] = MAGIC + bytes([VERSION, 0, 0, 0]) + struct.pack("<I", len(hb))
    out[12:12 + len(hb)] = hb
    for (_e, p), o in zip(entries, offsets):
        out[o:o + len(p)] = p
    return bytes(out)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def unpack_tensor(data: bytes):
    from qcompile.formats.base import QuantizedTensor
    from qcompile.formats.registry import from_json
    if len(data) < 12 or data[:4] != MAGIC:
        raise QuantizationError("not a packed qcompile tensor (bad magic)",
                                hint="pass bytes produced by QuantizedTensor.pack()")
    if data[4] != VERSION:
        raise QuantizationError(f"packed tensor has layout version {data[4]}, this qcompile "
                                f"reads version {VERSION}")
    (hlen,) = struct.unpack("<I", data[8:12])
    if 12 + hlen > len(data):
        raise QuantizationError(f"packed tensor is truncated: {len(data)} bytes, its header "
                                f"alone needs {12 + hlen}")
    try:
        header = json.loads(bytes(data[12:12 + hlen]))
    except ValueError as e:
        raise QuantizationError(f"packed tensor header is corrupt: {e}") from None
    fmt = from_json(header["format"])
    tensors = {}
    for s in header["sections"]:
        o, m = s["offset"], s["nbytes"]
        if o + m > len(data):
            raise QuantizationError(f"packed tensor is truncated in section {s['role']!r}")
        raw = data[o:o + m]
        shape = tuple(s["shape"])
        count = math.prod(shape)
        dt = getattr(torch, s["dtype"])
        if s["bits"] is not None:
            if dt not in _PACKED:
                raise QuantizationError(f"packed tensor section {s['role']!r} has bit-packed "
                                        f"dtype {s['dtype']!r}, which no format packs")
            u = unpack_bits(raw, s["bits"], count)
            a = _sign_extend(u, s["bits"], _NP[dt]) if _PACKED[dt][2] else u.astype(_NP[dt])
            t = torch.from_numpy(a.reshape(shape))
        elif dt == torch.bfloat16:
            t = torch.from_numpy(np.frombuffer(raw, "<i2").astype(np.int16).reshape(shape)
                                 ).view(torch.bfloat16)
        else:
            npd = np.dtype(_NP[dt]).newbyteorder("<")
            t = torch.from_numpy(np.frombuffer(raw, npd).astype(_NP[dt]).reshape(shape))
        tensors[s["role"]] = t
    codes = tensors.pop("codes")
    axis = header["axis"]
    axis = tuple(axis) if isinstance(axis, list) else axis
    return QuantizedTensor(fmt, codes, tensors, tuple(header["shape"]), axis,
                           getattr(torch, header["dtype"]))
