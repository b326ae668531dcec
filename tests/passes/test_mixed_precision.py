"""Mixed precision: the integer program against exhaustive search, CLADO's quadratic program,
the pass inside compile() (ties, fixed layers, overrides, summary, plot), quality against
uniform and random assignments on a digits CNN and MiniLM, latency budgets measured on `cpu`,
and the bad inputs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import Budget, QuantConfig
from qcompile.errors import ConfigError, PassError
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType
from qcompile.passes.mixed_precision import (
    PrecisionProblem,
    clado_matrix,
    exhaustive,
    plot_plan,
    solve_clado,
    solve_ilp,
)
from qcompile.passes.pipeline import quantize_graph
from qcompile.passes.quantize_weights import quantize_weights


# -- the integer program ---------------------------------------------------------------------
@st.composite
def problems(draw):
    L = draw(st.integers(1, 12))
    C = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.choice([2, 3, 4, 6, 8], C, replace=False))
    n = rng.integers(1, 1000, L)
    omega = rng.random((L, 1)) * rng.random((L, C)) * 2.0 ** -bits[None, :]
    sizes = n[:, None] * bits[None, :] * (1 + rng.random((L, C)) * 0.1)
    lat = rng.random((L, C)) + bits[None, :] * 0.1
    allowed = rng.random((L, C)) < 0.9
    allowed[np.arange(L), rng.integers(0, C, L)] = True
    ties = [(int(a), int(b)) for a, b in rng.integers(0, L, (draw(st.integers(0, 3)), 2))]
    from qcompile.passes.mixed_precision import _union
    groups = _union(L, ties)
    costs = {"size_mb": sizes / 1e6, "latency_ms": lat}
    offsets = {"size_mb": float(rng.random() * 1e-3), "latency_ms": float(rng.random() * 3)}
    limits = {}
    for k in draw(st.sets(st.sampled_from(sorted(costs)), min_size=1)):
        lo, hi = costs[k].min(1).sum(), costs[k].max(1).sum()
        limits[k] = offsets[k] + float(lo + draw(st.floats(0.0, 1.0)) * (hi - lo)) + 1e-12
    return PrecisionProblem([f"l{i}" for i in range(L)], [f"int{b}" for b in bits], omega, costs,
                            offsets, limits, allowed, groups)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_ilp_equals_exhaustive_search(p):
    best, val = exhaustive(p)
    if best is None:
        with pytest.raises(ConfigError):
            solve_ilp(p)
        return
    try:
        a, info = solve_ilp(p)
    except ConfigError:
        pytest.fail("HiGHS says infeasible where enumeration found an assignment")
    assert p.objective(a) == pytest.approx(val, rel=1e-7, abs=1e-15)
    for k, lim in p.limits.items():
        assert p.metric(k, a) <= lim * (1 + 1e-6)
    for g in p.groups:  # tied layers share their choice, and only allowed choices are taken
        assert len({a[i] for i in g}) == 1
    assert all(p.allowed[i, c] for i, c in enumerate(a))


def test_ilp_at_200_layers_by_4_choices_is_optimal():
    rng = np.random.default_rng(0)
    L, bits = 200, np.array([2, 3, 4, 8])
    n = rng.integers(1000, 100000, L)
    omega = np.sort(rng.random((L, 4)), axis=1)[:, ::-1] * rng.random((L, 1))
    p = PrecisionProblem([f"l{i}" for i in range(L)], ["int2", "int3", "int4", "int8"], omega,
                         {"avg_bits": n[:, None] * bits / n.sum()}, {}, {"avg_bits": 3.5},
                         np.ones((L, 4), bool), [[i] for i in range(L)])
    a, info = solve_ilp(p)
    assert info["optimal"]
    assert p.metric("avg_bits", a) <= 3.5 + 1e-9
    # any single swap that stays within the budget does not improve the objective
    base = p.objective(a)
    for i in rng.choice(L, 20, replace=False):
        for c in range(4):
            b = list(a)
            b[i] = c
            if p.metric("avg_bits", b) <= 3.5:
                assert p.objective(b) >= base - 1e-12


def test_infeasible_budget_names_the_least_achievable_value():
    p = PrecisionProblem(["a", "b"], ["int2", "int4"], np.ones((2, 2)),
                         {"avg_bits": np.array([[1.0, 2.0], [1.0, 2.0]])}, {}, {"avg_bits": 1.5},
                         np.ones((2, 2), bool), [[0], [1]])
    with pytest.raises(ConfigError, match=r"avg_bits=1\.5 cannot be met; the least achievable "
                                          r"is avg_bits=2"):
        solve_ilp(p)
    # each limit alone can be met, both together cannot
    q = PrecisionProblem(["a"], ["int2", "int8"], np.ones((1, 2)),
                         {"size_mb": np.array([[1.0, 4.0]]), "latency_ms": np.array([[4.0, 1.0]])},
                         {}, {"size_mb": 2.0, "latency_ms": 2.0}, np.ones((1, 2), bool), [[0]])
    with pytest.raises(ConfigError, match="cannot all be met together"):
        solve_ilp(q)


# -- CLADO -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_clado_recovers_the_optimum_of_an_exact_quadratic_loss(seed):
    import itertools
    rng = np.random.default_rng(seed)
    L, C = 4, 3
    # ΔL(x) = ‖Σ_p x_p e_p‖²: an exact quadratic, lower bits with larger error vectors
    E = rng.normal(size=(L * C, 6)) * np.tile([3.0, 1.0, 0.2], L)[:, None]
    p = PrecisionProblem([f"l{i}" for i in range(L)], ["int2", "int4", "int8"], np.zeros((L, C)),
                         {"avg_bits": np.tile([2.0, 4.0, 8.0], (L, 1)) / L}, {},
                         {"avg_bits": 4.5}, np.ones((L, C), bool), [[i] for i in range(L)])
    dl = lambda sel: float(np.square(E[sel].sum(0)).sum())  # noqa: E731
    var = [(g, c) for g in range(L) for c in range(C)]
    single = {v: dl([v[0] * C + v[1]]) for v in var}
    pair = {(a, b): dl([a[0] * C + a[1], b[0] * C + b[1]]) for i, a in enumerate(var)
            for b in var[i + 1:] if a[0] != b[0]}
    best = min(dl([i * C + c for i, c in enumerate(combo)])
               for combo in itertools.product(range(C), repeat=L)
               if p.metric("avg_bits", list(combo)) <= 4.5 + 1e-9)
    v2, G = clado_matrix(p, single, pair)
    a, info = solve_clado(p, v2, G)
    assert dl([i * C + c for i, c in enumerate(a)]) == pytest.approx(best, rel=1e-9)
    assert info["objective"] == pytest.approx(2 * best, rel=1e-6)  # xᵀGx = 2ΔL exactly
    # CLADO's projection makes G PSD and still yields a feasible assignment
    _, Gp = clado_matrix(p, single, pair, psd=True)
    assert np.linalg.eigvalsh(Gp).min() > -1e-9
    ap, _ = solve_clado(p, v2, Gp)
    assert p.metric("avg_bits", ap) <= 4.5 + 1e-9


def _cancelling_graph():
    """y = x·Waᵀ + x·Wbᵀ + x·Wcᵀ with Wb = −Wa: a's and b's rounding errors cancel exactly when
    they share a format (symmetric RTN: Q(−W) = −Q(W)), but each alone is large."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("cancel")
    x = g.add_input("x", TensorType(("n", 32), "float32"))
    wa = torch.randn(32, 32, generator=gen) * 2
    ws = {"a": wa, "b": -wa, "c": torch.randn(32, 32, generator=gen) * 0.5}
    outs = [g.add("linear", x, g.add_constant(f"{k}.weight", w), name=k) for k, w in ws.items()]
    g.outputs = [g.add("add", g.add("add", outs[0], outs[1]), outs[2])]
    data = [(torch.randn(64, 32, generator=gen),) for _ in range(2)]
    return g, data


def _loss(g, qg, data):
    ref = [Interpreter(g, fake_quant=False).run(*d)[0] for d in data]
    out = [Interpreter(qg).run(*d)[0] for d in data]
    return float(sum((o - r).pow(2).mean() for o, r in zip(out, ref)))


def test_clado_beats_hawq_under_strong_cross_layer_interaction():
    g, data = _cancelling_graph()
    res = {}
    for method in ("hawq-v3", "clado"):
        cfg = QuantConfig(group_size=None, mixed_precision=Budget(
            avg_bits=4, candidates=("int2", "int4", "int8"), method=method, samples=2,
            max_iters=50, tie_shared_inputs=False))
        qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
        res[method] = (_loss(g, qg, data), qg.meta["mixed_precision"].formats)
    assert res["clado"][1] == {"a": "int2", "b": "int2", "c": "int8"}
    assert res["hawq-v3"][1]["c"] != "int8"  # additive Ω never pays 8 bits for c
    assert res["clado"][0] < 0.5 * res["hawq-v3"][0]


# -- in the pipeline -----------------------------------------------------------------------------
def _qkv_graph():
    gen = torch.Generator().manual_seed(3)
    g = Graph("qkv")
    x = g.add_input("x", TensorType(("n", 64), "float32"))
    h = g.add("linear", x, g.add_constant("inp.weight", torch.randn(64, 64, generator=gen) / 8),
              name="inp")
    qkv = [g.add("linear", h, g.add_constant(f"{k}.weight", torch.randn(64, 64, generator=gen)
                                             / (8 if k != "v" else 2)), name=k)
           for k in ("q", "k", "v")]
    s = g.add("add", g.add("add", qkv[0], qkv[1]), qkv[2])
    g.outputs = [g.add("linear", g.add("relu", s),
                       g.add_constant("out.weight", torch.randn(8, 64, generator=gen) / 8),
                       name="out")]
    data = [torch.randn(32, 64, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    return g, data


def test_compile_ties_shared_inputs_fixes_first_last_and_reports(tmp_path):
    g, data = _qkv_graph()
    budget = Budget(avg_bits=4.5, fixed={"first": "int8", "last": "int8"}, samples=2,
                    max_iters=10)
    cm = qcompile.compile(g, "reference", config=QuantConfig(group_size=32,
                                                             mixed_precision=budget),
                          calibration=data)
    plan = cm.graph.meta["mixed_precision"]
    assert plan.formats["inp"] == plan.formats["out"] == "int8"
    assert plan.formats["q"] == plan.formats["k"] == plan.formats["v"]
    assert plan.predicted["avg_bits"] <= 4.5
    by_node = {n.name: n for n in cm.graph.nodes}
    for name, fmt in plan.formats.items():  # the weights carry the chosen formats
        assert by_node[name].inputs[1].quant.format == fmt
    s = cm.summary()["mixed_precision"]
    assert s["formats"] == plan.formats and s["limits"] == {"avg_bits": 4.5}
    assert "mixed precision (hawq-v3" in str(plan)
    out = plot_plan(plan, tmp_path / "bits.png",
                    pareto=[{"budget": b, "predicted": 1.0 / b, "measured": 2.0 / b}
                            for b in (3, 4, 5)])
    assert out.stat().st_size > 1000
    # the compiled model equals the interpreter on the chosen formats
    ref = Interpreter(cm.graph).run(data[0])[0]
    torch.testing.assert_close(cm(data[0]), ref)


def test_pinned_formats_are_not_offered_to_other_layers():
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, mixed_precision=Budget(
        avg_bits=8, candidates=("int2", "int4"), fixed={"first": "int8"}, samples=1,
        max_iters=2))
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    plan = qg.meta["mixed_precision"]
    assert plan.formats["inp"] == "int8"
    assert all(f in ("int2", "int4") for n, f in plan.formats.items() if n != "inp")
    p = plan.problem
    j = p.choices.index("int8")
    assert p.allowed[:, j].tolist() == [n == "inp" for n in p.layers]


def test_candidates_keep_only_the_weight_options_they_take():
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, weight_options={"symmetric": False},
                      mixed_precision=Budget(avg_bits=4.5, candidates=("int4", "nvfp4", "int8"),
                                             samples=1, max_iters=2))
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    p = qg.meta["mixed_precision"].problem
    assert p.allowed.all()  # nvfp4 takes no 'symmetric': it is offered without it
    for n in qg.nodes:
        if n.op == "linear" and n.inputs[1].quant.format.startswith("int"):
            assert n.inputs[1].quant.zero_point is not None  # the int layers are asymmetric


def test_non_finite_sensitivities_drop_the_choice_with_a_warning():
    from qcompile.passes.mixed_precision import _drop_non_finite, _Layer
    g, _ = _qkv_graph()
    nodes = [n for n in g.nodes if n.op == "linear"][:2]
    p = PrecisionProblem([n.name for n in nodes], ["int2", "int4"],
                         np.array([[np.nan, 1.0], [np.inf, 2.0]]),
                         {"avg_bits": np.array([[1.0, 2.0], [1.0, 2.0]])}, {}, {"avg_bits": 4},
                         np.ones((2, 2), bool), [[0], [1]])
    with pytest.warns(UserWarning, match="inp@int2"):
        _drop_non_finite(p, [_Layer(n, None) for n in nodes], Budget(avg_bits=4))
    assert p.allowed.tolist() == [[False, True], [False, True]]
    assert solve_ilp(p)[0] == [1, 1]
    q = PrecisionProblem(["a"], ["int2"], np.array([[np.nan]]), {"avg_bits": np.ones((1, 1))},
                         {}, {"avg_bits": 4}, np.ones((1, 1), bool), [[0]])
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no candidate format fits"):
        _drop_non_finite(q, [_Layer(nodes[0], None)], Budget(avg_bits=4))


def test_bf16_graphs_get_sensitivities_at_their_dtype():
    g = Graph("bf16")
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(("n", 32), "bfloat16"))
    h = g.add("linear", x, g.add_constant("a.weight", torch.randn(32, 32, generator=gen)
                                          .bfloat16()), name="a")
    g.outputs = [g.add("linear", g.add("relu", h), g.add_constant(
        "b.weight", torch.randn(8, 32, generator=gen).bfloat16()), name="b")]
    data = [torch.randn(16, 32, generator=gen).bfloat16() for _ in range(2)]
    for sens in ("trace", "measured"):
        cfg = QuantConfig(group_size=32, mixed_precision=Budget(
            avg_bits=3, candidates=("int2", "int4"), sensitivity=sens, samples=2, max_iters=3))
        qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
        assert np.isfinite(qg.meta["mixed_precision"].problem.omega).all()


def test_a_flat_tuple_of_patterns_is_one_tie_group():
    assert Budget(avg_bits=4, ties=("q", "k")).ties == (("q", "k"),)
    assert Budget(avg_bits=4, ties="q*").ties == (("q*",),)
    assert Budget(avg_bits=4, ties=[("q", "k"), ["v"]]).ties == (("q", "k"), ("v",))


def test_overrides_pin_layers_and_size_budget_counts_scales():
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, overrides={"inp": {"weights": "int4"}, "out": "skip"},
                      mixed_precision=Budget(size_mb=0.02, candidates=("int2", "int4", "int8"),
                                             samples=1, max_iters=5))
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    plan = qg.meta["mixed_precision"]
    assert plan.formats["inp"] == "int4" and "out" not in plan.formats
    assert qg.meta["quantize_weights"]["out"] == "float"
    # size: codes + one scale per group of 32 of the decided weights (the format's own
    # bits-per-element formula), every other constant at its dtype
    size = 0.0
    for n in qg.nodes:
        if n.op == "linear" and n.inputs[1].quant is not None:
            size += qg.constants[n.inputs[1].name].numel() * \
                n.inputs[1].quant.fmt.bits_per_element / 8
    size += g.constants["out.weight"].numel() * 4
    assert plan.predicted["size_mb"] == pytest.approx(size / 1e6, rel=1e-9)
    assert plan.predicted["size_mb"] <= 0.02


def test_measured_sensitivity_is_the_single_layer_loss_increase():
    from qcompile.formats import get
    from qcompile.passes.sensitivity import make_loss
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, mixed_precision=Budget(
        avg_bits=4, candidates=("int2", "int4", "int8"), sensitivity="measured", samples=2))
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    plan = qg.meta["mixed_precision"]
    p = plan.problem
    loss = make_loss(g, [[d] for d in data[:2]], None, "mse")
    for i, name in enumerate(p.layers):
        w = g.constants[f"{name}.weight"]
        for c, f in enumerate(p.choices):
            wq = get(f, group_size=32).fake_quant(w)
            with torch.no_grad():
                assert p.omega[i, c] == pytest.approx(float(loss({f"{name}.weight": wq})),
                                                      rel=1e-6, abs=1e-12)
    assert all(r["curvature"] is None for r in plan.layers)
    assert plan.predicted["avg_bits"] <= 4


def test_block_format_candidates_with_gptq():
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, algorithm="gptq", mixed_precision=Budget(
        avg_bits=4.2, candidates=("int3", "mxfp4", "nvfp4", "int8"), samples=1, max_iters=5))
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    plan = qg.meta["mixed_precision"]
    assert set(plan.formats.values()) <= {"int3", "mxfp4", "nvfp4", "int8"}
    assert plan.predicted["avg_bits"] <= 4.2
    report = qg.meta["quantize_weights"]
    for n in qg.nodes:
        if n.op == "linear":
            assert n.inputs[1].quant.format == plan.formats[n.name]
            assert report[n.name].startswith("gptq ")
    # every candidate's Ω and storage are known; the block formats' scales count in the size
    p = plan.problem
    j = p.choices.index("nvfp4")
    per = p.costs["size_mb"][0, j] * 1e6 * 8 / g.constants["inp.weight"].numel()
    # 4-bit codes, an 8-bit E4M3 scale per 16, and one fp32 tensor scale over 64×64
    assert per == pytest.approx(4 + 8 / 16 + 32 / 4096)


def test_eigenvalue_sensitivity_and_toml_round_trip(tmp_path):
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, mixed_precision={"gbops": 0.05, "sensitivity": "eigenvalue",
                                                      "samples": 1, "max_iters": 20})
    assert isinstance(cfg.mixed_precision, Budget)
    qg, _ = quantize_graph(g.clone(), cfg, data, progress=False)
    plan = qg.meta["mixed_precision"]
    assert plan.predicted["gbops"] <= 0.05
    # BOPs of one sample: 32 tokens × MACs × weight bits × 32-bit float activations
    macs = {"inp": 64 * 64, "q": 64 * 64, "k": 64 * 64, "v": 64 * 64, "out": 8 * 64}
    want = sum(32 * macs[k] * int(f[3:]) * 32 for k, f in plan.formats.items()) / 1e9
    assert plan.predicted["gbops"] == pytest.approx(want)
    p = tmp_path / "q.toml"
    p.write_text('weights = "int4"\ngroup_size = 32\n[mixed_precision]\navg_bits = 3.0\n'
                 'candidates = ["int2", "int4"]\nmethod = "clado"\n[mixed_precision.fixed]\n'
                 'first = "int8"\n')
    c2 = QuantConfig.from_toml(p)
    assert c2.mixed_precision == Budget(avg_bits=3.0, candidates=("int2", "int4"),
                                        method="clado", fixed={"first": "int8"})
    assert QuantConfig.from_dict(c2.to_dict()) == c2


# -- quality against uniform and random assignments ----------------------------------------------
def _random_assignments(plan, lo, hi, k, seed=0):
    prob = plan.problem
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < k:
        a = prob.assignment_of({gi: int(rng.integers(0, len(prob.choices)))
                                for gi in range(len(prob.groups))})
        if lo <= prob.metric("avg_bits", a) <= hi:
            out.append({n: prob.choices[c] for n, c in zip(prob.layers, a)})
    return out


def _apply(g, plan, formats, cfg):
    qg = g.clone()
    qg.meta["mixed_precision"] = dataclasses.replace(plan, formats=formats)
    return quantize_weights(qg, config=cfg, progress=False)


@pytest.fixture(scope="module")
def digits_cnn():
    from qcompile import zoo
    m, x, y = zoo.digits_convnet()  # trained here: a few seconds
    with torch.no_grad():
        assert (m(x[1400:]).argmax(1) == y[1400:]).float().mean() > 0.93
    g = qcompile.capture(m, (x[:64],), dynamic_shapes=({0: torch.export.Dim("b", max=4096)},))
    return g, x, y


def _kl_to_float(g, qg, x):
    with torch.no_grad():
        ref = Interpreter(g, fake_quant=False).run(x)[0]
        out = Interpreter(qg).run(x)[0]
    lp = torch.log_softmax(ref, -1)
    return float((lp.exp() * (lp - torch.log_softmax(out, -1))).sum(-1).mean())


def test_digits_cnn_hawq_beats_uniform_and_random_at_equal_bits(digits_cnn):
    g, x, y = digits_cnn
    cal, labels = [x[i:i + 128] for i in range(0, 512, 128)], [y[i:i + 128]
                                                               for i in range(0, 512, 128)]
    cfg = QuantConfig(group_size=None, mixed_precision=Budget(avg_bits=4.0, samples=4,
                                                              max_iters=50))
    qg, _ = quantize_graph(g.clone(), cfg, cal, labels=labels, progress=False)
    plan = qg.meta["mixed_precision"]
    assert plan.predicted["avg_bits"] <= 4.0
    assert {n.op for n in qg.nodes if n.op in ("conv", "linear") and n.inputs[1].quant} == \
        {"conv", "linear"}  # convolutions are decided and quantized too
    held = x[1400:]
    hawq = _kl_to_float(g, qg, held)
    uni, _ = quantize_graph(g.clone(), QuantConfig(weights="int4", group_size=None), None,
                            progress=False)
    assert hawq < _kl_to_float(g, uni, held)
    for fm in _random_assignments(plan, 3.5, 4.0, 4):
        assert hawq < _kl_to_float(g, _apply(g, plan, fm, cfg), held)
    # OHQ's measured sensitivity, on the same budget, does at least as well here
    mcfg = QuantConfig(group_size=None, mixed_precision=Budget(avg_bits=4.0, samples=4,
                                                               sensitivity="measured"))
    mq, _ = quantize_graph(g.clone(), mcfg, cal, labels=labels, progress=False)
    assert _kl_to_float(g, mq, held) <= hawq


@pytest.fixture(scope="module")
def minilm():
    from qcompile import zoo
    from qcompile.corpus import CALIBRATION, EVALUATION
    model, ex, dyn = zoo.minilm(batch=2, seq=24)
    g = qcompile.capture(model, ex, dynamic_shapes=dyn)
    cal = zoo.minilm_batches(CALIBRATION[:32], batch=16, seq=24)
    test = zoo.minilm_batches(EVALUATION[:32], batch=16, seq=24)
    return g, [list(b.values()) for b in cal], [list(b.values()) for b in test]


def test_minilm_hawq_beats_uniform_and_random_at_equal_bits(minilm):
    from qcompile.passes.sensitivity import make_loss
    g, cal, test = minilm
    cfg = QuantConfig(group_size=None, mixed_precision=Budget(avg_bits=3.0, samples=2,
                                                              max_iters=20))
    qg, _ = quantize_graph(g.clone(), cfg, cal, progress=False)
    plan = qg.meta["mixed_precision"]
    loss = make_loss(g, test, None, "mse")

    def err(q):
        loss.interp = Interpreter(q)
        with torch.no_grad():
            return float(loss())
    hawq = err(qg)
    uni, _ = quantize_graph(g.clone(), QuantConfig(weights="int3", group_size=None), None,
                            progress=False)
    assert hawq < err(uni)
    for fm in _random_assignments(plan, 2.75, 3.0, 3):
        assert hawq < err(_apply(g, plan, fm, cfg))


# -- latency budgets ------------------------------------------------------------------------------
def test_latency_budget_on_cpu_is_measured_cached_and_honoured(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    from qcompile.backends import latency
    g, data = _qkv_graph()

    def run(limit):
        cfg = QuantConfig(group_size=32, mixed_precision=Budget(
            latency_ms=limit, candidates=("int4", "int8"), samples=1, max_iters=5))
        return quantize_graph(g.clone(), cfg, data, progress=False, target="cpu")[0]
    qg = run(10.0)
    plan = qg.meta["mixed_precision"]
    per = np.array(plan.problem.costs["latency_ms"])
    assert (per[plan.problem.allowed] > 0).all()
    assert plan.predicted["latency_ms"] <= 10.0
    # int8 is corrected by a whole-model timing at int8: the uniform assignments then predict
    # exactly the whole-model times measured with them (round-robin, cached)
    corr = plan.solve["latency_correction_ms"]
    assert set(corr) == {"int8"} and np.isfinite(corr["int8"])
    p = plan.problem
    from qcompile.backends.latency import _cached, _model_key
    from qcompile.passes.mixed_precision import _Formats
    for c in range(len(p.choices)):
        q = g.clone()
        q.meta["mixed_precision"] = _Formats({n: p.choices[c] for n in p.layers})
        cfg = QuantConfig(group_size=32)
        q = quantize_weights(q, config=cfg, progress=False)
        q.meta.clear()
        t = _cached(_model_key(q, data[:1], "cpu"))
        assert t is not None
        assert p.metric("latency_ms", [c] * len(p.layers)) == pytest.approx(t, rel=1e-9)
    cache = latency.cache_path()
    assert cache.exists()
    monkeypatch.setattr(latency, "_compile_and_time", lambda *a, **k: pytest.fail("re-measured"))
    import qcompile.api
    monkeypatch.setattr(qcompile.api, "compile",
                        lambda *a, **k: pytest.fail("the whole model was measured again"))
    least = plan.problem.least("latency_ms")
    qg2 = run(least * 1.0001)  # everything from the cache; the tightest budget still solves
    assert qg2.meta["mixed_precision"].predicted["latency_ms"] <= least * 1.0001
    with pytest.raises(ConfigError, match="least achievable"):
        run(least * 0.5)


# -- bad input ------------------------------------------------------------------------------------
def test_budget_bad_fields():
    with pytest.raises(ConfigError, match="unknown mixed-precision method 'hawq-v9'"):
        Budget(avg_bits=4, method="hawq-v9")
    with pytest.raises(ConfigError, match="needs a limit"):
        Budget()
    with pytest.raises(ConfigError, match="positive number"):
        Budget(avg_bits=-1)
    with pytest.raises(ConfigError, match="unknown numeric format .int99."):
        Budget(avg_bits=4, candidates=("int4", "int99"))
    with pytest.raises(ConfigError, match="repeats"):
        Budget(avg_bits=4, candidates=("int4", "int4"))
    with pytest.raises(ConfigError, match="unknown sensitivity loss"):
        Budget(avg_bits=4, loss="hinge")
    with pytest.raises(ConfigError, match="unknown Budget field"):
        QuantConfig(mixed_precision={"avg_bit": 4})


@pytest.mark.parametrize("overrides,budget,match", [
    ({"inp": {"weights": "int4"}}, {"fixed": {"inp": "int8"}}, "conflicting formats"),
    ({"inp": "skip"}, {"fixed": {"inp": "int8"}}, "keeps inp in float"),
    ({}, {"fixed": {"nosuch*": "int8"}}, "matches no layer"),
    ({"q": {"weights": "int4"}, "k": {"weights": "int8"}}, {}, "pinned to different formats"),
    ({}, {"ties": [["nosuch"]]}, "matches no layer"),
])
def test_conflicting_overrides(overrides, budget, match):
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, overrides=overrides,
                      mixed_precision=Budget(avg_bits=4, samples=1, max_iters=2, **budget))
    with pytest.raises(PassError, match=match):
        quantize_graph(g.clone(), cfg, data, progress=False)


def test_pipeline_bad_inputs():
    g, data = _qkv_graph()
    cfg = QuantConfig(group_size=32, mixed_precision=Budget(avg_bits=1.0))
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_graph(g.clone(), cfg, None, progress=False)
    with pytest.raises(ConfigError, match="only mixed precision"):
        quantize_graph(g.clone(), QuantConfig(), data, labels=[0, 1, 2], progress=False)
    with pytest.raises(ConfigError, match="least achievable is avg_bits=2"):
        quantize_graph(g.clone(), cfg, data, progress=False)
    lat = QuantConfig(group_size=32, mixed_precision=Budget(latency_ms=1.0))
    with pytest.raises(PassError, match="latency budget needs latencies measured"):
        quantize_graph(g.clone(), lat, data, progress=False, target="reference")
    with pytest.raises(ConfigError, match="without a quantization config"):
        qcompile.compile(g, "reference", labels=[0])
