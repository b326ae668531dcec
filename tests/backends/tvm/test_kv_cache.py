"""The KV cache ops on the cpu target: written in place, and quantized rows equal to the
interpreter's byte for byte (and so to the fake-quant oracle)."""
import pytest
import torch

from qcompile.backends import get_backend
from qcompile.interpreter import run_graph
from qcompile.ir import Graph, TensorType
from qcompile.ir.ops.nn import kv_dequantize_rows, kv_quantize_rows, kv_row_bytes

H, S, D = 2, 12, 16


def _graph(bits: int, tokens="tokens") -> Graph:
    g = Graph("kv")
    last = kv_row_bytes(D, bits) if bits else D
    cache = g.add_input("cache", TensorType(("batch", H, S, last), "uint8" if bits else "float32"))
    new = g.add_input("new", TensorType(("batch", H, tokens, D), "float32"))
    slot = g.add_input("slot", TensorType((1,), "int64"))
    c = g.add("kv_write", cache, new, slot, bits=bits)
    g.outputs = [c] + ([g.add("kv_read", c, bits=bits, dim=D)] if bits else [])
    return g


def _rows(t=3, seed=0):
    x = torch.randn(2, H, t, D, generator=torch.Generator().manual_seed(seed))
    x[0, 1, 0] = 0.0                       # a row of zeros: scale 0, codes 0
    x[1, 0, -1, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0])  # ties round to even
    return x


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_cpu_writes_in_place_and_equals_the_interpreter_bytewise(bits):
    g = _graph(bits)
    ex = get_backend("cpu").lower(g, "cpu")
    dtype = torch.uint8 if bits else torch.float32
    shape = (2, H, S, kv_row_bytes(D, bits) if bits else D)
    mine, theirs = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    for step, (slot, t) in enumerate([(0, 3), (3, 1), (4, 2)]):
        x = _rows(t, step)
        outs = ex(mine, x, torch.tensor([slot]))
        ref = run_graph(g, theirs, x, torch.tensor([slot]))
        assert outs[0].data_ptr() == mine.data_ptr()          # the caller's cache, written
        assert torch.equal(mine, theirs)                      # byte for byte
        if bits:
            assert torch.equal(outs[1], ref[1])
    untouched = mine[:, :, 6:]
    assert not untouched.any()                                # only the slots written


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_equals_the_fake_quant_oracle_exactly(bits):
    x = _rows(5)
    oracle = kv_dequantize_rows(kv_quantize_rows(x, bits), bits, D)   # fake quant, per token
    m = (1 << (bits - 1)) - 1
    s = x.abs().amax(-1, keepdim=True) / m
    assert torch.equal(oracle, torch.round(x / torch.where(s > 0, s, 1)).clamp(-m, m) * s)
    g = _graph(bits, tokens=5)
    ex = get_backend("cpu").lower(g, "cpu")
    cache = torch.zeros(2, H, S, kv_row_bytes(D, bits), dtype=torch.uint8)
    read = ex(cache, x, torch.tensor([2]))[1]
    assert torch.equal(read[:, :, 2:7], oracle)
    assert cache.numel() < 2 * H * S * D * 4 / (3 if bits == 8 else 5)      # really smaller


def test_a_write_past_the_cache_is_an_error():
    with pytest.raises(Exception, match="outside a cache"):
        run_graph(_graph(8), torch.zeros(1, H, S, kv_row_bytes(D, 8), dtype=torch.uint8),
                  torch.randn(1, H, 2, D), torch.tensor([S - 1]))
