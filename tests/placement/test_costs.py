"""Fused groups, roofline and measured costs, capability masks (qcompile.placement.costs)."""
import math

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.backends import latency
from qcompile.backends.base import _BACKENDS, Backend, register_backend
from qcompile.errors import ConfigError
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType
from qcompile.placement import costs as C
from qcompile.placement.costs import Work, build_problem, calibrate, fused_groups, roofline, work_of
from qcompile.placement.devices import LINKS, SPECS, DeviceConfig, DeviceSpec, parse_devices

INF = math.inf


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Measurements go to a fresh cache, never the user's."""
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def timer(monkeypatch):
    """A fake ``time_call``: 1 ms per group call, 0.1 ms for an empty call; records each."""
    calls = []

    def fake(fn, args, **kw):
        fn(*args)
        graph = getattr(fn, "graph", None)
        calls.append(graph.name if graph is not None else "other")
        return 0.1 if graph is not None and graph.name == "empty" else 1.0
    monkeypatch.setattr(latency, "time_call", fake)
    return calls


class _Fake(Backend):
    """A test backend on the reference interpreter that refuses some ops."""

    def __init__(self, target, refuse=(), remote_s=None):
        self.name = target
        self.targets = (target,)
        self.refuse = set(refuse)
        self.remote_s = remote_s
        self.lowered = []     # the graphs lower() was given

    def supports(self, node):
        return node.op not in self.refuse

    def lower(self, graph, target, **options):
        self.lowered.append(graph)
        ex = Interpreter(graph)
        if self.remote_s is not None:
            secs = self.remote_s

            class Remote:
                def __call__(self, *a):
                    return ex(*a)

                def time_remote(self, args, number, repeat):
                    return [secs[graph.name == "empty"]] * repeat
            return Remote()
        return ex


@pytest.fixture
def fake_backend():
    made = []

    def make(target, **kw):
        made.append(target)
        return register_backend(_Fake(target, **kw))
    yield make
    for t in made:
        _BACKENDS.pop(t, None)


def group_names(groups):
    return [[n.name for n in g] for g in groups]


def _acyclic(graph, groups) -> bool:
    of = {n.name: i for i, g in enumerate(groups) for n in g}
    prod = {id(o): n for n in graph.nodes for o in n.outputs}
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(groups)))
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and id(v) in prod and of[prod[id(v)].name] != of[n.name]:
                dg.add_edge(of[prod[id(v)].name], of[n.name])
    return nx.is_directed_acyclic_graph(dg) and all(
        of[prod[id(v)].name] <= of[n.name] for n in graph.nodes for v in n.inputs
        if v is not None and id(v) in prod)  # the returned order is topological


# -- fused groups ----------------------------------------------------------------------------
def test_mlp_groups(mlp_graph):
    assert group_names(fused_groups(mlp_graph)) == [["fc1", "act"], ["fc2"]]


def residual_block() -> Graph:
    gen = torch.Generator().manual_seed(0)
    g = Graph("res")
    x = g.add_input("x", TensorType(("batch", 8), "float32"))
    w1 = g.add_constant("w1", torch.randn(8, 8, generator=gen))
    w2 = g.add_constant("w2", torch.randn(8, 8, generator=gen))
    h = g.add("linear", x, w1, name="fc1")
    r = g.add("relu", h, name="act1")
    y = g.add("linear", r, w2, name="fc2")
    z = g.add("add", r, y, name="residual")   # r has two readers: joins fc2 through y
    g.outputs = [g.add("relu", z, name="act2")]
    return g


def test_residual_block_groups_are_acyclic():
    g = residual_block()
    groups = fused_groups(g)
    assert group_names(groups) == [["fc1", "act1"], ["fc2", "residual", "act2"]]
    assert _acyclic(g, groups)


def test_light_node_reading_a_graph_output_or_shared_value_starts_a_group():
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 4), "float32"))
    w = g.add_constant("w", torch.ones(4, 4))
    h = g.add("linear", x, w, name="fc")
    a = g.add("neg", h, name="neg")            # h is also a graph output: no join
    c = g.add("exp", x, name="exp")            # reads only a graph input: its own group
    g.outputs = [h, a, g.add("mul", c, a, name="mul")]  # joins exp's group through c
    assert group_names(fused_groups(g)) == [["fc"], ["neg"], ["exp", "mul"]]


_OPS = ["linear", "relu", "neg", "add", "mul", "layer_norm", "exp"]


@st.composite
def random_graphs(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 100)))
    g = Graph("rand")
    vals = [g.add_input("x", TensorType((2, 8), "float32"))]
    for i in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(_OPS))
        a = vals[draw(st.integers(0, len(vals) - 1))]
        if op == "linear":
            vals.append(g.add("linear", a, g.add_constant(f"w{i}", torch.randn(8, 8, generator=gen)),
                              name=f"n{i}"))
        elif op in ("add", "mul"):
            b = vals[draw(st.integers(0, len(vals) - 1))]
            vals.append(g.add(op, a, b, name=f"n{i}"))
        else:
            vals.append(g.add(op, a, name=f"n{i}"))
    used = {id(v) for n in g.nodes for v in n.inputs}
    g.outputs = [v for v in vals[1:] if id(v) not in used] or [vals[-1]]
    return g


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_random_graph_groups(g):
    groups = fused_groups(g)
    flat = [n.name for grp in groups for n in grp]
    assert sorted(flat) == sorted(n.name for n in g.nodes)             # a partition
    order = {n.name: i for i, n in enumerate(g.nodes)}
    for grp in groups:
        assert [order[n.name] for n in grp] == sorted(order[n.name] for n in grp)
        assert all(n.op in C.LIGHT_OPS for n in grp[1:])                # only light nodes join
    assert _acyclic(g, groups)


def encoder(layers: int = 2, seq: int = 8, hidden: int = 16, heads: int = 2) -> Graph:
    """A MiniLM-like encoder: per layer q/k/v linears with head split, attention, head merge,
    output projection + residual, layer norm, GELU FFN + residual, layer norm."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("encoder")
    x = g.add_input("x", TensorType(("batch", seq, hidden), "float32"))
    dh = hidden // heads

    def w(name, o, i):
        return g.add_constant(name + ".weight", torch.randn(o, i, generator=gen) / i ** 0.5)

    def b(name, o):
        return g.add_constant(name + ".bias", torch.zeros(o))

    for li in range(layers):
        p = f"l{li}."
        qkv = []
        for k in "qkv":
            h = g.add("linear", x, w(p + k, hidden, hidden), b(p + k, hidden), name=p + k)
            h = g.add("reshape", h, shape=["batch", seq, heads, dh])
            qkv.append(g.add("permute", h, perm=[0, 2, 1, 3]))
        a = g.add("attention", *qkv, scale=dh ** -0.5, name=p + "attn")
        a = g.add("permute", a, perm=[0, 2, 1, 3])
        a = g.add("reshape", a, shape=["batch", seq, hidden])
        o = g.add("linear", a, w(p + "o", hidden, hidden), b(p + "o", hidden), name=p + "o")
        x = g.add("layer_norm", g.add("add", o, x), name=p + "ln1")
        f = g.add("gelu", g.add("linear", x, w(p + "f1", 2 * hidden, hidden), name=p + "f1"))
        f = g.add("linear", f, w(p + "f2", hidden, 2 * hidden), name=p + "f2")
        x = g.add("layer_norm", g.add("add", f, x), name=p + "ln2")
    g.outputs = [x]
    return g


def test_encoder_groups():
    g = encoder(layers=1)
    groups = group_names(fused_groups(g))
    assert [grp[0] for grp in groups] == ["l0.q", "l0.k", "l0.v", "l0.attn", "l0.o", "l0.ln1",
                                          "l0.f1", "l0.f2", "l0.ln2"]
    ops = {grp[0]: [n.op for n in fused_groups(g)[i]] for i, grp in enumerate(groups)}
    assert ops["l0.q"] == ["linear", "reshape", "permute"]
    assert ops["l0.attn"] == ["attention", "permute", "reshape"]
    assert ops["l0.o"] == ["linear", "add"] and ops["l0.f1"] == ["linear", "gelu"]


# -- roofline --------------------------------------------------------------------------------
TOY = DeviceSpec("gpu", fp32=1e9, fp16=2e9, int8=4e9, bandwidth=1e6, launch=1e-6, memory=None,
                 source="test", efficiency=0.5)


def test_roofline_of_one_linear_by_hand(mlp_graph):
    shapes, _, env = C._record(mlp_graph, (torch.randn(4, 8),))
    static = C._static_copy(mlp_graph, shapes, env)
    fc2 = [n for n in static.nodes if n.name == "fc2"]
    w = work_of(static, fc2)
    # linear [4,16] x [4,16]^T: 2*4*4*16 flops; bytes: W 4*16*4 + b 4*4 + x 4*16*4 + y 4*4*4
    assert w == Work(flops=2 * 4 * 4 * 16, bytes=256 + 16 + 256 + 64, precision="float", heavy=True)
    # memory-bound on TOY: 592 B / 1e6 B/s = 592 us, / efficiency 0.5, + 1 us launch
    assert roofline(TOY, w) == pytest.approx(592e-6 / 0.5 + 1e-6)
    # compute-bound on an A100 at fp16: 512 flops / 312e12 vs 592 B / 1555e9 -> bytes win
    a100 = SPECS["a100-40gb-pcie"]
    assert roofline(a100, w, 1.0) == pytest.approx(592 / 1555e9 + 5e-6)
    big = Work(flops=1e12, bytes=1e6, precision="int8")
    assert roofline(a100, big, 1.0) == pytest.approx(1e12 / 624e12 + 5e-6)
    assert roofline(TOY, Work(2e9, 0, "int16"), 1.0) == pytest.approx(1.0 + 1e-6)


def test_calibrate_recovers_the_efficiency():
    works = [Work(1e6 * k, 1e3 * k) for k in (1, 3, 10)]
    measured = [(w, roofline(TOY, w, 0.25)) for w in works]
    assert calibrate(TOY, measured) == pytest.approx(0.25)
    assert calibrate(TOY, []) == TOY.efficiency


def test_quantized_work_counts_stored_bits():
    from qcompile.config import QuantConfig
    from qcompile.passes.pipeline import quantize_graph
    g = Graph("q")
    x = g.add_input("x", TensorType((4, 64), "float32"))
    g.outputs = [g.add("linear", x, g.add_constant("w", torch.randn(32, 64)), name="fc")]
    cfg = QuantConfig(weights="int8", group_size=None, activations="uint16",
                      activation_granularity="per_tensor")
    q, _ = quantize_graph(g, cfg, [(torch.randn(4, 64),)], target="npu", progress=False)
    w = work_of(q, q.nodes)
    # int8 codes + one fp32 scale per output channel, activations at 16 bits
    assert w.bytes == 32 * 64 + 32 * 4 + 4 * 64 * 2 + 4 * 32 * 2
    assert w.precision == "int16"
    assert C.storage_bytes(q, q.nodes[0].inputs[1]) == 32 * 64 + 32 * 4


# -- build_problem ---------------------------------------------------------------------------
def test_build_problem_measures_cpu_and_reference(mlp_graph):
    devs, links = parse_devices(["cpu", "reference"])
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    p = cm.problem
    assert cm.groups == {"fc1": ["fc1", "act"], "fc2": ["fc2"]}
    for g in p.order:
        for d in ("cpu", "reference"):
            assert 0 <= p.cost(g, d) < 1.0 and cm.source[(g, d)] == "measured"
    assert p.graph.edges["fc1", "fc2"]["bytes"] == 3 * 16 * 4          # relu output, float32
    assert p.graph.nodes["fc1"]["mem"] == 16 * 8 * 4 + 16 * 4
    assert p.graph.nodes["fc1"]["op"] == "linear"
    # a cross-device edge pays the link plus the receiving device's empty call
    assert p.link("cpu", "reference").latency == pytest.approx(
        links[("cpu", "reference")].latency + cm.overhead["reference"])


def test_rebuild_hits_the_cache(mlp_graph, timer, monkeypatch):
    devs, links = parse_devices(["reference"])
    sample = (torch.randn(3, 8),)
    cm = build_problem(mlp_graph, devs, links, sample, progress=False)
    assert set(cm.source.values()) == {"measured"}
    assert cm.problem.cost("fc1", "reference") == pytest.approx(0.9e-3)   # 1 ms - 0.1 ms empty
    monkeypatch.setattr(latency, "time_call", lambda *a, **k: pytest.fail("measured again"))
    again = build_problem(mlp_graph, devs, links, sample, progress=False)
    assert set(again.source.values()) == {"cached"}
    assert again.problem.cost("fc1", "reference") == cm.problem.cost("fc1", "reference")


def test_other_shapes_are_measured_again(mlp_graph, timer):
    devs, links = parse_devices(["reference"])
    build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    n = len(timer)
    build_problem(mlp_graph, devs, links, (torch.randn(5, 8),), progress=False)
    assert len(timer) == n + 2  # both groups at the new batch size; the empty call is cached


def test_identical_layers_are_measured_once(timer):
    g = encoder(layers=3)
    devs, links = parse_devices(["reference"])
    cm = build_problem(g, devs, links, (torch.randn(2, 8, 16),), progress=False)
    groups = list(cm.groups)
    assert len(groups) == 27
    # one timing per distinct signature: q/k/v (one), attention, o+add, f1+gelu, f2+add, and
    # the two weightless layer norms (one)
    measured = [t for t in timer if t not in ("empty", "other")]
    assert len(measured) == 6
    assert all(cm.source[(grp, "reference")] == "measured" for grp in groups)
    assert cm.problem.cost("l2.ln2", "reference") == cm.problem.cost("l0.ln2", "reference")


# -- copies of a group -----------------------------------------------------------------------
def _quantized_linear():
    """An NPU-quantized linear + relu: int8 weight with a per-channel scale, uint16 activations
    with a static scale and zero point each (the input's, the linear's, the relu's)."""
    from qcompile.config import QuantConfig
    from qcompile.passes.pipeline import quantize_graph
    gen = torch.Generator().manual_seed(0)
    g = Graph("q")
    x = g.add_input("x", TensorType((4, 64), "float32"))
    h = g.add("linear", x, g.add_constant("w", torch.randn(32, 64, generator=gen)),
              g.add_constant("b", torch.randn(32, generator=gen)), name="fc")
    g.outputs = [g.add("relu", h, name="act")]
    cfg = QuantConfig(weights="int8", group_size=None, activations="uint16",
                      activation_granularity="per_tensor")
    return quantize_graph(g, cfg, [(torch.randn(4, 64, generator=gen),)], target="npu",
                          progress=False)[0]


def test_replicate_clones_constants_and_quant_parameters():
    from qcompile.placement.subgraph import extract
    q = _quantized_linear()
    sub = extract(q, q.nodes, "grp")
    assert C.replicate(sub, 1) is sub
    r = C.replicate(sub, 3)
    assert r.name == "grp" and [v.name for v in r.inputs] == [v.name for v in sub.inputs]
    assert [n.op for n in r.nodes] == [n.op for n in sub.nodes] * 3
    assert len(r.outputs) == 3 * len(sub.outputs)
    # every constant but the input's own scale and zero point is cloned for each copy
    x_params = set(sub.inputs[0].quant.constants())
    assert x_params and x_params <= set(r.constants)
    assert len(r.constants) == len(x_params) + 3 * (len(sub.constants) - len(x_params))
    ptrs = {t.data_ptr() for t in r.constants.values()}
    assert len(ptrs) == len(r.constants)                      # no tensor is shared
    lins = [n for n in r.nodes if n.op == "linear"]
    for i, n in enumerate(lins):
        assert n.inputs[0] is r.inputs[0]                     # all copies read the same input
        w = n.inputs[1]
        assert r.is_constant(w) and w.quant is not None
        assert torch.equal(r.constants[w.name], sub.constants[sub.nodes[0].inputs[1].name])
        # each copy's specs (weight's and activations') name that copy's own parameters
        names = set(w.quant.constants()) | set(n.outputs[0].quant.constants())
        assert names <= set(r.constants) and not names & x_params
        for m in lins[:i]:
            assert not names & (set(m.inputs[1].quant.constants()) | set(m.outputs[0].quant.constants()))
    # the copies compute what the group does
    xin = torch.randn(4, 64)
    want = Interpreter(sub)(xin)
    got = Interpreter(r)(xin)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, t in enumerate(got):
        assert torch.equal(t, want[i % len(want)])


def test_copies_follow_the_weight_bytes(monkeypatch):
    from qcompile.placement.subgraph import extract
    g = encoder(layers=1)
    shapes, _, env = C._record(g, (torch.randn(2, 8, 16),))
    static = C._static_copy(g, shapes, env)
    groups = {grp[0].name: grp for grp in fused_groups(static)}
    q = extract(static, groups["l0.q"], "q")                  # 16x16 weight + bias: 1088 B
    assert C.weight_bytes(q) == 16 * 16 * 4 + 16 * 4
    assert C.copies(extract(static, groups["l0.attn"], "a")) == 1   # no weights
    assert C.copies(q, 5 * 1088) == 5                         # a model's worth of bytes
    assert C.copies(q, 1000) == 1                             # a model as small as the group
    assert C.copies(q) == C.MAX_COPIES                        # past COPY_BYTES: capped
    monkeypatch.setattr(C, "MAX_COPY_NODES", 30)
    assert C.copies(q) == 10                                  # 3 nodes a copy
    monkeypatch.setattr(C, "COPY_BYTES", 10_000)
    assert C.copies(q, 20_000) == 10                          # ceil(10000 / 1088): passes it
    monkeypatch.setattr(C, "MAX_COPY_TENSOR_BYTES", 4 * 1088)
    assert C.copies(q, 20_000) == 4


def test_measured_groups_are_timed_as_copies(mlp_graph, monkeypatch):
    """One call runs k copies (own weights each); the cost is (call - empty call - handing back
    the k - 1 further outputs) / k, cached under a key naming k, so a time cached for one copy
    is not reused."""
    timed = []

    def fake(fn, args, **kw):   # 0.1 ms a call, 0.01 ms an output past the first, 1 ms a node
        fn(*args)
        timed.append(fn.graph)
        g = fn.graph
        return 0.1 + 0.01 * (len(g.outputs) - 1) + (0 if g.name == "empty" else len(g.nodes))
    monkeypatch.setattr(latency, "time_call", fake)
    monkeypatch.setattr(C, "COPY_BYTES", 800)                # the 848 B model passes it
    devs, links = parse_devices(["reference"])
    sample = (torch.randn(3, 8),)
    # an entry of the old key (no copies) for fc2 must not be taken
    shapes, _, env = C._record(mlp_graph, sample)
    static = C._static_copy(mlp_graph, shapes, env)
    from qcompile.placement.subgraph import extract
    fc2 = extract(static, [n for n in static.nodes if n.name == "fc2"], "fc2")
    latency._store(C._key(devs[0], {"group": C.signature(fc2)}), 123.0)
    cm = build_problem(mlp_graph, devs, links, sample, progress=False)
    graphs = {g.name: g for g in timed}
    # fc1: 576 B of weights -> ceil(800 / 576) = 2 copies of linear + relu; fc2: 272 B -> 3
    assert [n.op for n in graphs["fc1"].nodes] == ["linear", "relu"] * 2
    assert [n.op for n in graphs["fc2"].nodes] == ["linear"] * 3
    for name, k in (("fc1", 2), ("fc2", 3)):
        g = graphs[name]
        ws = [n.inputs[1] for n in g.nodes if n.op == "linear"]
        assert len({w.name for w in ws}) == k and len({g.constants[w.name].data_ptr() for w in ws}) == k
        assert len(g.outputs) == k
        assert cm.source[(name, "reference")] == "measured"
        assert cm.problem.cost(name, "reference") == pytest.approx(len(g.nodes) / k * 1e-3)
    assert cm.overhead["reference"] == pytest.approx(0.1e-3)
    # the roofline calibration fits one copy's time
    from qcompile.placement.devices import host_spec
    pairs = [(cm.work[g], cm.problem.cost(g, "reference")) for g in ("fc1", "fc2")]
    assert cm.efficiency["reference"] == pytest.approx(calibrate(host_spec(), pairs))
    again = build_problem(mlp_graph, devs, links, sample, progress=False)
    assert set(again.source.values()) == {"cached"}
    assert again.problem.cost("fc2", "reference") == cm.problem.cost("fc2", "reference")


def test_refused_nodes_get_inf_and_reasons(mlp_graph, fake_backend, timer):
    fake_backend("norelu", refuse={"relu"})
    devs, links = parse_devices(["norelu", "reference"])
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert cm.problem.cost("fc1", "norelu") == INF
    assert cm.refused[("fc1", "norelu")] == ["act: op relu has no lowering for target 'norelu'"]
    assert cm.problem.cost("fc2", "norelu") < INF and cm.problem.cost("fc1", "reference") < INF
    with pytest.raises(ConfigError, match=r"node 'act' cannot run on any device: norelu refused "
                                          r"\(op relu has no lowering for target 'norelu'\)") as e:
        build_problem(mlp_graph, devs[:1], {}, (torch.randn(3, 8),), progress=False)
    assert e.value.node is not None and e.value.node.name == "act"


def test_lowering_failures_keep_the_group_off(mlp_graph, fake_backend, timer, monkeypatch):
    be = fake_backend("flaky")
    real = be.lower

    def lower(graph, target, **kw):
        if any(n.op == "relu" for n in graph.nodes):
            raise RuntimeError("no kernel for relu today")
        return real(graph, target, **kw)
    monkeypatch.setattr(be, "lower", lower)
    devs, links = parse_devices(["flaky", "reference"])
    with pytest.warns(UserWarning, match="1 group"):
        cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert cm.problem.cost("fc1", "flaky") == INF
    assert "no kernel for relu today" in cm.refused[("fc1", "flaky")][0]
    assert cm.problem.cost("fc2", "flaky") < INF


def test_remote_executables_time_themselves(mlp_graph, fake_backend, timer):
    be = fake_backend("remote", remote_s=(2e-3, 5e-4))   # (a call, an empty call)
    devs, links = parse_devices(["remote"])
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    # the remote times the same copies as a local device: fc2 (272 B of weights in an 848 B
    # model) as 3 copies in one call, fc1 (576 B) alone
    timed = {g.name: g for g in be.lowered}
    assert [n.op for n in timed["fc2"].nodes] == ["linear"] * 3
    assert [n.op for n in timed["fc1"].nodes] == ["linear", "relu"]
    assert cm.problem.cost("fc2", "remote") == pytest.approx(1.5e-3 / 3)
    assert cm.problem.cost("fc1", "remote") == pytest.approx(1.5e-3)
    assert cm.overhead["remote"] == pytest.approx(5e-4)
    assert timer == []  # nothing timed here


def test_modelled_devices_and_trivial_groups(timer):
    g = Graph("t")
    x = g.add_input("x", TensorType((4, 8), "float32"))
    n = g.add("neg", x, name="neg")            # no producer: a trivial group of its own
    g.outputs = [g.add("linear", n, g.add_constant("w", torch.randn(8, 8)), name="fc")]
    devs, links = parse_devices({"ref": {"target": "reference"},
                                 "gpu": {"target": "cuda", "spec": "t4", "measure": False}})
    cm = build_problem(g, devs, links, (torch.randn(4, 8),), progress=False)
    assert cm.source[("neg", "ref")] == "modelled" and cm.source[("fc", "ref")] == "measured"
    assert cm.source[("neg", "gpu")] == cm.source[("fc", "gpu")] == "modelled"
    t4 = SPECS["t4"]
    assert cm.problem.cost("fc", "gpu") == pytest.approx(roofline(t4, cm.work["fc"]))
    assert cm.efficiency["gpu"] == t4.efficiency and "ref" in cm.efficiency
    # into "ref" a transfer also pays ref's empty call (0.1 ms here); into the gpu nothing
    assert cm.problem.link("gpu", "ref").latency == pytest.approx(
        cm.problem.link("ref", "gpu").latency + 1e-4)
    assert "fc" in cm.table() and cm.counts() == {"measured": 1, "modelled": 3}


def test_npu_capability_mask(mlp_graph, timer, monkeypatch):
    from qcompile.backends.onnx import npu
    devs, links = parse_devices(["npu", "reference"])
    # a float graph: the HTP runs none of it, and says why
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert all(cm.problem.cost(g, "npu") == INF for g in cm.groups)
    assert "quantized models only" in cm.refused[("fc2", "npu")][0]
    # a quantized graph: the nodes capability() names are refused, the rest modelled
    monkeypatch.setattr(npu, "check_graph", lambda graph, target: None)
    seen = []

    def capability(self, graph, target="npu"):
        seen.append((target, [v.shape for v in graph.inputs]))
        return {"fc2": ["Gemm: unsupported bias type"]}
    monkeypatch.setattr(npu.NpuBackend, "capability", capability)
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert seen == [("npu", [(3, 8)])]     # called once, on static shapes
    assert cm.problem.cost("fc2", "npu") == INF
    assert cm.refused[("fc2", "npu")] == ["fc2: Gemm: unsupported bias type"]
    assert cm.source[("fc1", "npu")] == "modelled" and cm.efficiency["npu"] == 0.3
    again = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert len(seen) == 1 and again.refused == cm.refused   # the probe's answer is cached


def test_npu_capability_probe_on_the_simulator(timer):
    """The real QNN probe (x86 simulator, seconds) on an NPU-quantized MLP: everything runs."""
    from qcompile.backends.onnx import qnn
    if not qnn.available()[0]:
        pytest.skip("onnxruntime-qnn is not installed")
    from qcompile.config import QuantConfig
    from qcompile.passes.pipeline import quantize_graph
    g = Graph("mlp")
    x = g.add_input("x", TensorType((4, 16), "float32"))
    # biases given: the ONNX export of a bias-less linear fails (backends/onnx/export.py)
    h = g.add("relu", g.add("linear", x, g.add_constant("w1", torch.randn(32, 16)),
                            g.add_constant("b1", torch.randn(32)), name="fc1"))
    g.outputs = [g.add("linear", h, g.add_constant("w2", torch.randn(8, 32)),
                       g.add_constant("b2", torch.randn(8)), name="fc2")]
    cfg = QuantConfig(weights="int8", group_size=None, activations="uint16",
                      activation_granularity="per_tensor")
    q, _ = quantize_graph(g, cfg, [(torch.randn(4, 16),)], target="npu", progress=False)
    devs, links = parse_devices(["npu", "reference"])
    cm = build_problem(q, devs, links, (torch.randn(4, 16),), progress=False)
    assert not any(d == "npu" for _, d in cm.refused)
    assert cm.work["fc1"].precision == "int16"
    assert 0 < cm.problem.cost("fc1", "npu") < 1e-3


def test_device_config_objects_and_missing_links(mlp_graph, timer):
    devs = [DeviceConfig("a", "reference"), DeviceConfig("b", "cuda", spec="t4", measure=False)]
    cm = build_problem(mlp_graph, devs, {}, (torch.randn(3, 8),), progress=False)
    assert cm.problem.link("a", "b") == LINKS["pcie3-x16"].link  # the T4's own link


def test_terminals_carry_the_callers_tensors(mlp_graph, timer):
    # the gpu computes in its own memory: x must cross PCIe to reach it and the output back
    devs, links = parse_devices({"ref": {"target": "reference"},
                                 "gpu": {"target": "cuda", "spec": "t4", "measure": False}})
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert cm.terminals == {"<input x>": "fc1", "<output 0 fc2>": "fc2"}
    pcie = LINKS["pcie3-x16"].link
    g = cm.problem.graph
    assert g.nodes["<input x>"]["cost"]["ref"] == 0.0
    assert g.nodes["<input x>"]["cost"]["gpu"] == pytest.approx(pcie.latency + 3 * 8 * 4 / pcie.bandwidth)
    assert g.nodes["<output 0 fc2>"]["cost"]["gpu"] == pytest.approx(
        pcie.latency + 3 * 4 * 4 / pcie.bandwidth)
    assert g.edges["<input x>", "fc1"]["bytes"] == 3 * 8 * 4
    assert set(cm.groups) == {"fc1", "fc2"}  # terminals are not groups
    # with every device in host memory there is nothing to carry
    devs, links = parse_devices(["reference", "cpu"])
    cm = build_problem(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False)
    assert cm.terminals == {} and set(cm.problem.order) == {"fc1", "fc2"}


def test_a_given_assignment_takes_its_terminals_along(mlp_graph, timer):
    from qcompile.passes.place import place
    devs, links = parse_devices({"ref": {"target": "reference"},
                                 "gpu": {"target": "cuda", "spec": "t4", "measure": False}})
    pl = place(mlp_graph, devs, links, (torch.randn(3, 8),), progress=False,
               plan={"solve": False, "assignment": {"fc1": "gpu", "fc2": "ref"}})
    assert pl.plan.assignment["<input x>"] == "gpu"
    assert pl.plan.assignment["<output 0 fc2>"] == "ref"
    assert pl.assignment == {"fc1": "gpu", "act": "gpu", "fc2": "ref"}
    # the upload is part of the predicted makespan
    assert pl.plan.start["fc1"] == pytest.approx(pl.plan.finish["<input x>"])


def test_remote_groups_are_timed_there_plus_their_parameter_handles(mlp_graph, monkeypatch):
    """A remote's group: its own timer for the kernels (no inputs or outputs crossing the
    link), plus each parameter handle the call passes; never the wall clock here."""
    seen = []

    class Ex:
        params = [0] * 6

        def time_remote(self, args, number, repeat):
            return [4e-3] * repeat

        def __call__(self, *a):  # pragma: no cover - a wall-clock timing would call it
            seen.append("wall")

    class Be:
        def lower(self, graph, target, **kw):
            return Ex()
    monkeypatch.setattr(C, "_backend", lambda target: Be())
    monkeypatch.setattr(latency, "time_call", lambda *a, **k: seen.append("wall") or 1.0)
    from qcompile.placement.subgraph import extract
    sub = extract(mlp_graph, [n for n in mlp_graph.nodes if n.name == "fc2"], "fc2")
    d = DeviceConfig("r", "reference")
    kept = {v.name: torch.randn(3, 16) for v in sub.inputs}
    got = C._measure_cached(d, sub, kept, "k", 0.0, k=2, per_param=1e-4)
    assert not isinstance(got, str), got
    secs, how = got
    assert secs == pytest.approx((4e-3 + 6 * 1e-4) / 2) and how == "measured"
    assert seen == []


def test_the_parameter_probe_passes_its_constants_as_parameters():
    # the probe for a remote's per-handle cost must not have its constants embedded
    from qcompile.backends import get_backend
    ex = get_backend("cpu").lower(C._param_graph(C._PARAMS), "cpu")
    assert len(ex.params) == C._PARAMS
    x = torch.randn(64)
    out = ex(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.allclose(out, -x + sum(range(1, C._PARAMS + 1)))
