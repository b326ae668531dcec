"""Cutting a placed graph into segments: extracted subgraphs compute what the graph does, and
the segment graph of any assignment is acyclic and covers every node once."""
from __future__ import annotations

import networkx as nx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.interpreter import run_graph
from qcompile.ir import Graph, TensorType
from qcompile.placement.subgraph import boundary, extract, partition


def _diamond() -> Graph:
    """x -> a(linear) -> b(relu) ----\\
                     \\-> c(tanh) -> d(add b) -> e(linear) -> out; plus a second output c."""
    gen = torch.Generator().manual_seed(1)
    g = Graph("diamond")
    x = g.add_input("x", TensorType((2, 8), "float32"))
    w = g.add_constant("w", torch.randn(8, 8, generator=gen))
    w2 = g.add_constant("w2", torch.randn(4, 8, generator=gen))
    a = g.add("linear", x, w, None, name="a")
    b = g.add("relu", a, name="b")
    c = g.add("tanh", a, name="c")
    d = g.add("add", b, c, name="d")
    e = g.add("linear", d, w2, None, name="e")
    g.outputs = [e, c]
    return g


def _run_segments(g: Graph, segments, *xs):
    env = {v.name: x for v, x in zip(g.inputs, xs)}
    by_name = {n.name: n for n in g.nodes}
    for s in segments:
        sub = extract(g, [by_name[n] for n in s.nodes], s.name)
        outs = run_graph(sub, *[env[i] for i in s.inputs])
        env.update(zip(s.outputs, outs))
    return [env[v.name] for v in g.outputs]


def test_boundary_and_extract_compute_the_same():
    g = _diamond()
    nodes = [n for n in g.nodes if n.name in ("b", "c", "d")]
    ins, outs = boundary(g, nodes)
    assert [v.name for v in ins] == ["a"]
    assert [v.name for v in outs] == ["c", "d"]     # c is a graph output, d feeds e
    sub = extract(g, nodes, "mid")
    assert [v.name for v in sub.inputs] == ["a"] and [v.name for v in sub.outputs] == ["c", "d"]
    assert sub.constants == {}                      # the weights stay with a and e
    x = torch.randn(2, 8)
    a = run_graph(extract(g, g.nodes[:1]), x)[0]
    c, d = run_graph(sub, a)
    ref_e, ref_c = run_graph(g, x)
    torch.testing.assert_close(c, ref_c, rtol=0, atol=0)
    e = run_graph(extract(g, g.nodes[-1:]), d)[0]
    torch.testing.assert_close(e, ref_e, rtol=0, atol=0)


def test_partition_never_makes_a_cycle_on_the_diamond():
    g = _diamond()
    # a and d on one device, b (between them) on another: one segment {a, d} would be a cycle
    assignment = {"a": "p", "b": "q", "c": "p", "d": "p", "e": "q"}
    segs = partition(g, assignment)
    seg_of = {n: i for i, s in enumerate(segs) for n in s.nodes}
    assert seg_of["a"] != seg_of["d"]
    x = torch.randn(2, 8)
    for got, ref in zip(_run_segments(g, segs, x), run_graph(g, x)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _random_graph(n: int, edges: list[tuple[int, int]]) -> Graph:
    """A float graph of ``n`` nodes: node i adds the outputs of its listed predecessors
    (or reads x), then applies tanh, so each node's value is distinct."""
    g = Graph("random")
    x = g.add_input("x", TensorType((3,), "float32"))
    vals = []
    for i in range(n):
        preds = sorted({u for u, v in edges if v == i})
        v = x if not preds else vals[preds[0]]
        for u in preds[1:]:
            v = g.add("add", v, vals[u], name=f"s{i}_{u}")
        vals.append(g.add("tanh", v, name=f"n{i}"))
    sinks = [vals[i] for i in range(n) if not any(u == i for u, _ in edges)]
    g.outputs = sinks
    return g


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_partition_is_acyclic_and_exact_for_any_assignment(data):
    n = data.draw(st.integers(2, 9))
    pairs = [(u, v) for v in range(n) for u in range(v)]
    edges = data.draw(st.lists(st.sampled_from(pairs), max_size=12, unique=True)) if pairs else []
    g = _random_graph(n, edges)
    devs = data.draw(st.lists(st.sampled_from("pqr"), min_size=len(g.nodes), max_size=len(g.nodes)))
    assignment = {node.name: d for node, d in zip(g.nodes, devs)}
    segs = partition(g, assignment)
    assert sorted(n for s in segs for n in s.nodes) == sorted(assignment)
    assert all(assignment[n] == s.device for s in segs for n in s.nodes)
    # segments come in a topological order of the segment graph
    producer = {o: i for i, s in enumerate(segs) for o in s.outputs}
    sg = nx.DiGraph()
    sg.add_nodes_from(range(len(segs)))
    for i, s in enumerate(segs):
        for v in s.inputs:
            if v in producer:
                assert producer[v] < i
                sg.add_edge(producer[v], i)
    assert nx.is_directed_acyclic_graph(sg)
    x = torch.randn(3)
    for got, ref in zip(_run_segments(g, segs, x), run_graph(g, x)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_partition_keeps_one_segment_per_device_on_a_chain():
    g = _diamond()
    segs = partition(g, dict.fromkeys([n.name for n in g.nodes], "p"))
    assert len(segs) == 1 and segs[0].inputs == ["x"] and segs[0].outputs == ["c", "e"]


def test_segment_inputs_follow_the_subgraph_whatever_the_schedule_order():
    """Two inputs of one shape, first used in one order in the graph and scheduled in the
    other: the segment must list them as its subgraph takes them (a swap went unnoticed
    once, feeding a mask as token ids)."""
    g = Graph("two_inputs")
    a = g.add_input("a", TensorType((3,), "float32"))
    b = g.add_input("b", TensorType((3,), "float32"))
    ua = g.add("tanh", a, name="ua")
    ub = g.add("relu", b, name="ub")
    g.outputs = [g.add("sub", ua, ub, name="out")]
    segs = partition(g, dict.fromkeys(["ua", "ub", "out"], "p"), order=["ub", "ua", "out"])
    sub = extract(g, [n for n in g.nodes], "s")
    assert segs[0].inputs == [v.name for v in sub.inputs] == ["a", "b"]
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(_run_segments(g, segs, x, y)[0], run_graph(g, x, y)[0])
