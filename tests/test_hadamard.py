"""Hadamard matrices (Sylvester, Paley I/II, Goethals–Seidel), the fast transform, random signs,
and the IR op ``hadamard`` built on them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcompile._hadamard_data import GS_SEQUENCES
from qcompile._hadamard_search import _orbits, find_gs_sequences, paf_sum, to_hex
from qcompile.errors import ConfigError, VerificationError
from qcompile.hadamard import base_order, fwht, hadamard_matrix, random_signs, supported
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType

QUAROT_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)  # QuaRot's hand-made K list


def _orthogonality_error(h: torch.Tensor) -> float:
    return (h @ h.T - torch.eye(h.shape[0], dtype=h.dtype)).abs().max().item()


def _block_diag(n: int, d: int, dtype=torch.float64, transpose=False) -> torch.Tensor:
    h = hadamard_matrix(n, dtype)
    return torch.block_diag(*[h.T if transpose else h] * (d // n))


# -- matrices ------------------------------------------------------------------------------
def test_every_multiple_of_four_up_to_172_is_supported():
    assert all(supported(n) for n in (1, 2, *range(4, 173, 4)))
    assert not any(supported(n) for n in (0, 3, 6, 10, 30, 170, -4, 12.0, True))
    assert base_order(11008) == (172, 64) and base_order(384) == (12, 32)
    assert base_order(1536) == (12, 128) and base_order(4096) == (1, 4096)
    assert base_order(40) == (20, 2) and base_order(28) == (28, 1)  # 27 = 3³: Paley I over GF(27)


@pytest.mark.parametrize("n", [n for n in range(1, 173) if supported(n)])
def test_base_orders_are_orthonormal_hadamard(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert _orthogonality_error(h) < 1e-12
    assert torch.equal(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))  # ±1/√n, one rounding
    assert torch.equal(h, hadamard_matrix(n))  # deterministic


@pytest.mark.parametrize("n", [384, 1536, 4096])
def test_model_sizes_are_orthogonal(n):
    assert _orthogonality_error(hadamard_matrix(n)) < 1e-12


def test_llama_dff_11008_is_orthogonal():
    h = hadamard_matrix(11008)  # a full H Hᵀ takes half a minute here: check rows spread over it
    rows = torch.cat([torch.arange(64), torch.randperm(11008)[:192], torch.arange(10944, 11008)])
    gram = h[rows] @ h.T
    gram[torch.arange(len(rows)), rows] -= 1
    assert gram.abs().max().item() < 1e-12
    assert torch.equal(h[rows].abs(), torch.full((len(rows), 11008), 1 / math.sqrt(11008), dtype=h.dtype))


def test_prime_power_paley_and_dtype():
    for n in (28, 52, 100, 244, 252):  # q = 27, 25, 49, 243 and 2·(125 + 1)
        assert _orthogonality_error(hadamard_matrix(n)) < 1e-12, n
    h32 = hadamard_matrix(12, torch.float32)
    assert h32.dtype == torch.float32 and torch.allclose(h32.double(), hadamard_matrix(12))
    assert not torch.equal(h32, h32.T)  # Paley I is not symmetric: the transpose attr matters


# -- Goethals–Seidel data ------------------------------------------------------------------
def _decode(n: int) -> np.ndarray:
    return np.array([[-1 if int(s, 16) >> i & 1 else 1 for i in range(n)] for s in GS_SEQUENCES[n][1]])


@pytest.mark.parametrize("n", sorted(GS_SEQUENCES))
def test_gs_sequences_have_zero_summed_autocorrelation(n):
    seqs = _decode(n)
    h, _ = GS_SEQUENCES[n]
    assert paf_sum(seqs).tolist() == [4 * n] + [0] * (n - 1)
    for orbit in _orbits(n, h):  # constant on the multiplier orbits the search assumed
        assert (seqs[:, orbit] == seqs[:, orbit[:1]]).all()
    assert base_order(4 * n) == (4 * n, 1) and _orthogonality_error(hadamard_matrix(4 * n)) < 1e-12


@pytest.mark.parametrize("n", [39, 43])  # 156 and 172; each search takes milliseconds
def test_search_reproduces_the_stored_sequences(n):
    h, quad = find_gs_sequences(n)
    assert (h, tuple(to_hex(s) for s in quad)) == GS_SEQUENCES[n]


# -- fwht ----------------------------------------------------------------------------------
FWHT_CASES = [  # (size, last dim): whole axis and block-diagonal chunks, every construction
    (1, 3), (2, 2), (64, 64), (16, 64), (12, 12), (12, 36), (20, 40), (28, 56), (36, 36),
    (52, 104), (60, 60), (108, 108), (140, 280), (156, 156), (172, 344), (384, 768), (1536, 1536),
]


@pytest.mark.parametrize("size,d", FWHT_CASES)
def test_fwht_equals_dense_block_diagonal_matmul(size, d):
    x = torch.randn(2, 3, d, dtype=torch.float64)
    ref = x @ _block_diag(size, d)
    y = fwht(x, size)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert (y - ref).abs().max().item() < 1e-12
    y32 = fwht(x.float(), size)
    assert y32.dtype == torch.float32 and (y32.double() - ref).abs().max().item() < 1e-5
    if size == d:
        assert torch.equal(fwht(x), y)  # size=None is the whole axis


@pytest.mark.parametrize("size,d", [(12, 24), (20, 20), (172, 172), (256, 512)])
def test_fwht_transpose_is_the_inverse(size, d):
    x = torch.randn(4, d, dtype=torch.float64)
    yt = fwht(x, size, transpose=True)
    assert (yt - x @ _block_diag(size, d, transpose=True)).abs().max().item() < 1e-12
    assert (fwht(fwht(x, size), size, transpose=True) - x).abs().max().item() < 1e-12
    assert (fwht(yt, size) - x).abs().max().item() < 1e-12


def test_fwht_11008_whole_axis():
    x = torch.randn(3, 11008, dtype=torch.float64)
    ref = x @ hadamard_matrix(11008)
    assert (fwht(x) - ref).abs().max().item() < 1e-12
    assert (fwht(x.float()).double() - ref).abs().max().item() < 1e-5
    assert (fwht(ref, transpose=True) - x).abs().max().item() < 1e-12


def test_fwht_gradients_flow():
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: fwht(t, 12), (x,))
    w = torch.randn(2, 24, dtype=torch.float64)
    (fwht(x, 12) * w).sum().backward()  # d/dx of <x·B, w> is w·Bᵀ
    assert torch.allclose(x.grad, w @ _block_diag(12, 24).T, atol=1e-12)


def test_fwht_bad_inputs():
    with pytest.raises(ValueError, match="does not divide the last dimension 24"):
        fwht(torch.randn(2, 24), 16)
    with pytest.raises(ConfigError, match="order 6"):
        fwht(torch.randn(2, 24), 6)
    with pytest.raises(TypeError, match="floating-point"):
        fwht(torch.ones(2, 4, dtype=torch.int64))


def test_unsupported_orders_say_what_is_supported():
    with pytest.raises(ConfigError) as ei:
        hadamard_matrix(6)
    assert "1, 2 and multiples of 4" in str(ei.value) and ei.value.hint.endswith("4, 8")
    with pytest.raises(ConfigError) as ei:  # 668 = 4·167: no Hadamard matrix of it is known
        hadamard_matrix(668)
    msg = str(ei.value)
    assert "Paley" in msg and "156, 172" in msg and "nearest supported orders are 664, 672" in msg
    for bad in (0, -4, 2.5, "12"):
        with pytest.raises(ConfigError, match="positive integer"):
            base_order(bad)


def test_random_signs():
    s = random_signs(64, seed=3)
    assert s.dtype == torch.float64 and set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(64, seed=3)) and not torch.equal(s, random_signs(64, seed=4))
    rotation = torch.diag(s) @ hadamard_matrix(64)
    assert _orthogonality_error(rotation) < 1e-12


# -- the IR op -----------------------------------------------------------------------------
def _hadamard_graph(shape, dtype="float32", **attrs) -> Graph:
    g = Graph("rot")
    x = g.add_input("x", TensorType(shape, dtype))
    g.outputs = [g.add("hadamard", x, name="had", **attrs)]
    return g


@pytest.mark.parametrize("size,transpose", [(12, False), (12, True), (36, False), (172, True)])
def test_op_matches_dense_matrix(size, transpose):
    g = _hadamard_graph(("batch", 2 * size), "float64", size=size, transpose=transpose)
    assert g.outputs[0].type == TensorType(("batch", 2 * size), "float64")
    x = torch.randn(5, 2 * size, dtype=torch.float64)
    (y,) = Interpreter(g).run(x)
    assert (y - x @ _block_diag(size, 2 * size, transpose=transpose)).abs().max().item() < 1e-12


@pytest.mark.parametrize("shape,dtype,size,needle", [
    ((4, 24), "float32", 16, "does not divide the last dimension 24"),
    ((4, 24), "float32", 6, "no Hadamard matrix of order 6"),
    ((4, 668), "float32", 668, "nearest supported orders are 664, 672"),
    ((4, "d"), "float32", 12, "static last dimension"),
    ((4, 12), "int32", 12, "floating-point"),
])
def test_op_rejects_bad_sizes_when_added(shape, dtype, size, needle):
    with pytest.raises(VerificationError, match=needle) as ei:
        _hadamard_graph(shape, dtype, size=size)
    assert "hadamard" in str(ei.value)
