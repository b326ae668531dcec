"""Target ``amx`` end to end: the TVM-FFI entries equal the ctypes kernels bit for bit; an MLP
through the Relax VM equals the interpreter running the ctypes kernels in its linears, bit for
bit, and the fake-quant interpreter within bf16 activation rounding; MiniLM pruned 50% (Wanda,
magnitude) with bf16 weights (also on the AVX2 kernels), and W8A8 with pruned int8 weights; the
layout rule; artifacts; fallbacks (below AVX2: the dense cpu kernels, with one warning); and
the run-time choice of AMX, AVX-512 or AVX2 (``QCOMPILE_NO_AMX=1``, ``QCOMPILE_ISA``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import numpy as np
import pytest
import torch

import qcompile
from qcompile import isa, zoo
from qcompile.backends.amx import format as F
from qcompile.backends.amx.lower import _pad16, choose_sparse
from qcompile.config import QuantConfig
from qcompile.errors import ArtifactError, BackendError
from qcompile.interpreter import Interpreter

needs_tvm = pytest.mark.skipif(find_spec("tvm") is None, reason="target amx needs Apache TVM")
needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= isa.host_features(),
                                reason="the sparse kernels need AVX2 and FMA at least")
pytestmark = needs_tvm

BF16_WANDA = dict(weights="bf16", sparsity=0.5, sparsity_method="wanda")
BF16_MAGNITUDE = dict(weights="bf16", sparsity=0.5, sparsity_method="magnitude")
W8A8_SPARSE = dict(weights="int8", group_size=None, activations="int8", sparsity=0.5,
                   sparsity_method="magnitude")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def _int8(w):
    s = (w.abs().amax(1) / 127).clamp_min(1e-8)
    return torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8), s


def _pruned(n, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


def _ffi_args(sw):
    a = ([sw.masks] if sw.masks is not None else []) + [sw.values, sw.offsets]
    if sw.kind == "int8":
        a += [_pad16(sw.colsum, np.int32), _pad16(sw.scale, np.float32)]
    return a


@pytest.fixture(scope="module")
def kernels():
    """The FFI library, registered; and the kind it runs here."""
    from qcompile.backends.amx import ffi
    mod = ffi.load(ffi.compile_library())
    ffi.register(mod, ffi.KERNELS)
    return mod, ffi.kind(mod)


def test_layout_rule():
    assert not choose_sparse("bf16", 0.0) and not choose_sparse("bf16", 0.1)
    assert choose_sparse("bf16", 0.12) and choose_sparse("bf16", 0.5)
    assert not choose_sparse("int8", 0.15) and choose_sparse("int8", 0.2)
    # AVX2: int8 expansion costs more than the bytes it saves (benchmarks/sparse.py --isa avx2)
    assert not choose_sparse("int8", 0.9, "avx2") and choose_sparse("bf16", 0.5, "avx2")
    assert choose_sparse("int8", 0.9, "amx")


# -- the FFI entry points ----------------------------------------------------------------------

@needs_avx2
def test_ffi_entries_equal_the_ctypes_kernels_bit_for_bit(kernels, isa_level):
    """Same kind, same per-output accumulation order: the entries (TVM's pool, rows converted
    per task, work cut in row blocks × column units) give the ctypes kernels' bits, on the kind
    each ISA level runs (chosen per call); below AVX2 they refuse."""
    import tvm
    import tvm_ffi

    from qcompile.backends.amx import build as B
    from qcompile.backends.amx import ffi
    mod, _ = kernels
    kind = ffi.kind(mod)
    assert kind == B.best_kind()
    lib = B.library()
    if kind is None:
        sw = F.sparse(_pruned(16, 32, 0.5, 0), "bf16")
        f = tvm_ffi.get_global_func(ffi.global_name("bf16_sparse"))
        with pytest.raises(ValueError, match="no sparse kernel runs here"):
            f(tvm.runtime.tensor(np.ones((1, 32), np.float32)),
              *[tvm.runtime.tensor(a) for a in _ffi_args(sw)],
              tvm.runtime.tensor(np.zeros((1, 16), np.float32)))
        return
    rng = np.random.default_rng(0)
    t = tvm.runtime.tensor
    for i, (n, k) in enumerate([(200, 384), (64, 100), (1536, 384)]):
        w = _pruned(n, k, 0.5, i)
        q, s = _int8(w)
        layouts = [F.sparse(w, "bf16"), F.dense(w, "bf16"), F.sparse(q, "int8", scale=s),
                   F.dense(q, "int8", scale=s)]
        for sw in layouts:
            name = ffi.kernel_name(sw.kind, sw.masks is not None)
            f = tvm_ffi.get_global_func(ffi.global_name(name))
            for lead, bias in (((1,), True), ((5,), False), ((2, 37), True)):
                x = rng.standard_normal((*lead, k)).astype(np.float32)
                b = rng.standard_normal(n).astype(np.float32) if bias else None
                want = lib.matmul(x, sw, b, kind=kind, nthreads=2)
                y = t(np.full((*lead, n), np.nan, np.float32))
                f(t(x), *[t(a) for a in _ffi_args(sw)], *([t(b)] if bias else []), y)
                np.testing.assert_array_equal(y.numpy(), want, err_msg=f"{name} {n}x{k} {lead}")


@needs_avx2
def test_ffi_entries_refuse_bad_arguments(kernels):
    import tvm
    import tvm_ffi

    from qcompile.backends.amx import ffi
    t = tvm.runtime.tensor
    q, s = _int8(_pruned(32, 64, 0.5, 0))
    sw = F.sparse(q, "int8", scale=s)
    f = tvm_ffi.get_global_func(ffi.global_name("int8_sparse"))
    x, y = t(np.zeros((2, 64), np.float32)), t(np.zeros((2, 32), np.float32))
    a = [t(v) for v in _ffi_args(sw)]
    with pytest.raises(ValueError, match="qc_amx_int8_sparse: masks does not match K and N"):
        f(t(np.zeros((2, 128), np.float32)), *a, y)
    with pytest.raises(ValueError, match="x is not float32"):
        f(t(np.zeros((2, 64), np.float64)), *a, y)
    with pytest.raises(ValueError, match="colsum is not of N rounded up to 16"):
        f(x, a[0], a[1], a[2], t(sw.colsum[:20].copy()), a[4], y)
    with pytest.raises(ValueError, match=r"takes \(x, masks, values, offsets, colsum, scale"):
        f(x, a[0], y)
    with pytest.raises(ValueError, match="values does not match"):
        f(x, a[0], t(sw.values[:-1].copy()), *a[2:], y)


# -- models --------------------------------------------------------------------------------------

class _KernelLinear:
    """A linear schema that runs the ctypes kernels on the target's layout."""

    def __init__(self, sw, kind):
        self.sw, self.kind = sw, kind  # kind None: what the ctypes library picks now

    def run(self, args, attrs, env):
        from qcompile.backends.amx import build as B
        x, b = args[0], args[2] if len(args) > 2 else None
        y = B.library().matmul(x.reshape(-1, x.shape[-1]).numpy(), self.sw,
                               None if b is None else b.numpy(), kind=self.kind, nthreads=2)
        return [torch.from_numpy(y).reshape(*x.shape[:-1], -1)]


def _kernel_oracle(graph, kind) -> Interpreter:
    """The interpreter with every pruned bf16 linear on the ctypes kernels."""
    it = Interpreter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op == "linear" and n.inputs[1].sparsity is not None:
            it._schemas[i] = _KernelLinear(F.sparse(graph.constants[n.inputs[1].name], "bf16"),
                                           kind)
    return it


def _falls_back_below_avx2(model, ex, dyn, cfg, cal):
    """At the generic level no sparse kernel runs: every pruned linear goes to the dense cpu
    kernels, on record (executable, report, summary) and with exactly one warning; the result
    is the cpu target's (fp32 sums of the same bf16 weights: the interpreter within 1e-5)."""
    import warnings as W
    with W.catch_warnings(record=True) as got:
        W.simplefilter("always")
        cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn, config=cfg,
                              calibration=cal)
    mine = [w for w in got if "target 'amx'" in str(w.message)]
    assert len(mine) == 1 and "3 pruned linear(s) fall back to the dense cpu kernels" in \
        str(mine[0].message) and "ISA level 'generic'" in str(mine[0].message)
    e = cm._exec
    assert e.kernels == [] and e.report["linear.amx.fallback"] == 3
    assert set(e.fallbacks) == {"linear", "linear_1", "linear_2"}
    assert all(v.startswith("no sparse kernel runs at ISA level 'generic'")
               for v in e.fallbacks.values())
    assert cm.summary()["fallbacks"] == e.fallbacks
    x = torch.randn(6, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 1e-5


@needs_avx2
@pytest.mark.parametrize("opts", [BF16_WANDA, BF16_MAGNITUDE], ids=["wanda", "magnitude"])
def test_mlp_equals_the_kernels_bit_for_bit_and_the_interpreter_closely(opts, isa_level):
    """Every linear reads the graph input or a ReLU, so the VM's kernels see the activations
    the oracle does: the same bits. Against fp32 activations (the interpreter) the bf16
    rounding of activations costs relative L2 ~2.5e-3 (measured 2.4e-3 and 2.3e-3)."""
    model, ex, dyn = zoo.mlp()
    cal = [(torch.randn(32, 64),) for _ in range(2)]
    if isa_level == "generic":
        _falls_back_below_avx2(model, ex, dyn, QuantConfig(**opts), cal)
        return
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**opts), calibration=cal)
    e = cm._exec
    assert e.report == {"linear.amx.bf16_sparse": 3} and not e.fallbacks
    assert e.kernels == ["bf16_sparse"]
    assert e.kernel_kind in {"avx2": ("avx2",), "avx512": ("avx512", "avx2"),
                             "amx": ("amx", "avx512", "avx2")}[isa_level]
    for n in cm.graph.nodes:
        if n.op == "linear":
            assert abs(n.inputs[1].sparsity.ratio - 0.5) < 0.01
    x = torch.randn(37, 64)  # another batch than captured: 2 AMX row tiles and a part
    out = cm(x)
    assert torch.equal(out, _kernel_oracle(cm.graph, e.kernel_kind).run(x)[0])
    assert _rel(out, Interpreter(cm.graph).run(x)[0]) < 5e-3


@needs_avx2
def test_mlp_w8a8_on_pruned_int8_weights(isa_level):
    """The kernel quantizes rows as the interpreter's fake quantization does and sums exactly:
    only fp32 rounding of the two scalings differs (measured relative L2 1.3e-7)."""
    model, ex, dyn = zoo.mlp()
    cal = [(torch.randn(32, 64),) for _ in range(2)]
    if isa_level == "generic":
        _falls_back_below_avx2(model, ex, dyn, QuantConfig(**W8A8_SPARSE), cal)
        return
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**W8A8_SPARSE), calibration=cal)
    # on AVX2 the int8 weights stay dense (choose_sparse): the same exact sums either way
    layout = "int8_dense" if isa_level == "avx2" else "int8_sparse"
    assert cm._exec.report == {f"linear.amx.{layout}": 3} and not cm._exec.fallbacks
    x = torch.randn(21, 64)
    out, ref = cm(x), Interpreter(cm.graph).run(x)[0]
    assert _rel(out, ref) < 1e-5
    # and it is the cpu target's W8A8 kernel's result, within fp32 rounding
    cpu = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn,
                           config=QuantConfig(**W8A8_SPARSE), calibration=cal)
    assert cpu._exec.report == {"linear.w8a8": 3} and _rel(out, cpu(x)) < 1e-5


@needs_avx2
def test_low_sparsity_uses_the_dense_layout():
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(weights="bf16", sparsity=0.05,
                                             sparsity_method="magnitude"))
    assert cm._exec.report == {"linear.amx.bf16_dense": 3}
    x = torch.randn(6, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 5e-3


@pytest.fixture(scope="module")
def minilm():
    from qcompile.corpus import CALIBRATION
    model, ex, dyn = zoo.minilm(batch=2, seq=16)
    return model, ex, dyn, zoo.minilm_batches(CALIBRATION[:16], batch=8, seq=16)


@needs_avx2
@pytest.mark.parametrize("opts", [BF16_WANDA, BF16_MAGNITUDE], ids=["wanda", "magnitude"])
def test_minilm_pruned_half_matches_the_interpreter(minilm, opts):
    """All 37 linears (6 × q k v o, intermediate, output; the pooler) on the sparse kernels.
    Six layers of bf16 activation rounding: relative L2 against the interpreter measured
    3.1e-3 / 2.7e-3 (hidden states / pooler, Wanda) and 3.5e-3 / 2.2e-3 (magnitude), cosine
    0.99999; the bound is 1e-2."""
    model, ex, dyn, cal = minilm
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**opts), calibration=cal)
    r = cm._exec.report
    assert r["linear.amx.bf16_sparse"] == 37 and not cm._exec.fallbacks
    assert not any(k.startswith("linear.") and k != "linear.amx.bf16_sparse" for k in r), r
    ref = Interpreter(cm.graph).run(*ex.values())
    for a, b in zip(cm(**ex), ref):
        assert _rel(a, b) < 1e-2 and _cos(a, b) > 0.9999


@needs_avx2
def test_minilm_pruned_half_on_the_avx2_kernels(minilm, monkeypatch):
    """What an AVX2-only CPU runs: every linear on the AVX2 sparse kernel, the same bound as
    above (the AVX2 kernel's sums are the AVX-512 kernel's, bit for bit)."""
    monkeypatch.setenv("QCOMPILE_ISA", "avx2")
    model, ex, dyn, cal = minilm
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**BF16_WANDA), calibration=cal)
    assert cm._exec.report["linear.amx.bf16_sparse"] == 37 and not cm._exec.fallbacks
    assert cm._exec.kernel_kind == "avx2" and cm.isa["level"] == "avx2"
    assert "avx512f" not in cm.isa["features"]
    ref = Interpreter(cm.graph).run(*ex.values())
    for a, b in zip(cm(**ex), ref):
        assert _rel(a, b) < 1e-2 and _cos(a, b) > 0.9999


# -- artifacts and the run-time kind -----------------------------------------------------------

_OTHER_KIND = textwrap.dedent("""
    import sys
    import numpy as np, torch
    import qcompile
    back = qcompile.load(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2]))
    np.save(sys.argv[3], back(x).numpy())
    print(back._exec.kernel_kind)
""")


@needs_avx2
@pytest.mark.parametrize("opts", [W8A8_SPARSE, BF16_MAGNITUDE], ids=["w8a8", "bf16"])
def test_artifact_round_trip_and_the_run_time_kind(tmp_path, opts):
    """An artifact holds the kernels once; it loads to the same results; in a process where
    the gate says no (``QCOMPILE_NO_AMX=1``) the very same artifact runs on AVX-512: the same
    bits for int8 (exact int32 sums), last-bit differences for bf16."""
    from qcompile.backends.amx import build as B
    from qcompile.backends.amx.build import best_kind
    model, ex, dyn = zoo.mlp()
    cfg = QuantConfig(**opts)
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn, config=cfg)
    a = cm.save(tmp_path / "a")
    b = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                         config=cfg).save(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert {"model.so", "tvm_params.safetensors", "amx_kernels.so", "amx_kernels.json",
            "graph.json", "manifest.json"} <= set(files)
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []  # same bytes
    rows = json.loads((a / "amx_kernels.json").read_text())["kernels"]
    assert rows == [{"kernel": k, "function": f"qcompile.amx.{k}"} for k in cm._exec.kernels]
    x = torch.randn(40, 64)
    back = qcompile.load(a)
    here = cm(x)
    assert back.target == "amx" and torch.equal(back(x), here)
    assert cm._exec.kernel_kind == best_kind() == back._exec.kernel_kind
    np.save(tmp_path / "x.npy", x.numpy())
    r = subprocess.run([sys.executable, "-c", _OTHER_KIND, str(a), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], capture_output=True, text=True,
                       env={**os.environ, "QCOMPILE_NO_AMX": "1"})
    no_amx = "avx512" if B.library().has_avx512() and isa.at_least("avx512") else "avx2"
    assert r.returncode == 0 and r.stdout.split()[-1] == no_amx, r.stderr[-3000:]
    there = torch.from_numpy(np.load(tmp_path / "y.npy"))
    if opts["weights"] == "int8":
        assert torch.equal(there, here)
    else:
        assert _rel(there, here) < 1e-5
    lib = bytearray((b / "amx_kernels.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (b / "amx_kernels.so").write_bytes(bytes(lib))
    with pytest.raises(ArtifactError, match="amx_kernels.so.*SHA-256"):
        qcompile.load(b)


def test_a_model_without_pruned_linears_is_the_cpu_build(tmp_path):
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(weights="bf16"))
    assert cm._exec.kernels == [] and cm._exec.fallbacks == {}
    assert not any(k.startswith("linear.amx") for k in cm._exec.report)
    art = cm.save(tmp_path / "a")
    assert not (art / "amx_kernels.so").exists()
    x = torch.randn(3, 64)
    assert torch.equal(qcompile.load(art)(x), cm(x))


# -- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("opts,why,kind", [
    (dict(weights="int8", group_size=None, sparsity=0.5, sparsity_method="magnitude"),
     "int8: the int8 kernels are W8A8", "linear.w8"),
    (dict(weights="int4", group_size=32, sparsity=0.5, sparsity_method="magnitude"),
     "int4: the sparse kernels take bf16", "linear.w4"),
    (dict(weights=None, sparsity=0.5, sparsity_method="magnitude"),
     "float32: the sparse kernels take bf16", "linear.dense"),
], ids=["int8-weight-only", "int4", "fp32"])
def test_pruned_weights_the_kernels_cannot_take_fall_back_on_record(opts, why, kind):
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**opts))
    e = cm._exec
    assert e.report["linear.amx.fallback"] == 3 and e.kernels == []
    assert sum(v for k, v in e.report.items() if k.startswith(kind)) == 3, e.report
    assert set(e.fallbacks) == {"linear", "linear_1", "linear_2"}
    assert e.fallbacks["linear"].startswith(why), e.fallbacks["linear"]
    x = torch.randn(6, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 1e-5


@needs_avx2
def test_partly_pruned_model_mixes_kernels():
    """An override leaves the last layer dense and unpruned: it lowers as on cpu, unrecorded."""
    model, ex, dyn = zoo.mlp()
    cfg = QuantConfig(weights="bf16", sparsity=0.5, sparsity_method="magnitude",
                      overrides={"4": {"sparsity": 0.0}})
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn, config=cfg)
    e = cm._exec
    assert e.report.get("linear.amx.bf16_sparse") == 2 and not e.fallbacks, e.report
    assert set(e.taken) == {"linear", "linear_1"}
    x = torch.randn(6, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 5e-3


def test_a_cpu_without_the_instructions_is_told_before_the_vm_runs(monkeypatch):
    from qcompile.backends.amx import ffi
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn,
                          config=QuantConfig(**BF16_MAGNITUDE))
    monkeypatch.setattr(ffi, "kind", lambda module: None)
    with pytest.raises(BackendError, match="need AVX2 and FMA at least.*\n.*dense cpu kernels"):
        cm(torch.randn(2, 64))
