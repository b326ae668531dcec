"""Synthetic cost graphs for trying and testing the placement solvers (no IR behind them):
transformer-like block chains and fork/join chains. The tests and ``benchmarks/`` share them."""
from __future__ import annotations

import math
import random

import networkx as nx

from qcompile.placement.costgraph import Link, Problem

__all__ = ["transformer_chain", "fork_join_chain"]

INF = math.inf


def transformer_chain(blocks: int, devices=("cpu", "gpu0", "gpu1", "npu"), seed=0, repeat=True,
                      mask=False) -> Problem:
    """Transformer-like blocks of 18 nodes: attention (q/k/v fork, rotary on q and k, a
    residual) then a gated MLP (up/gate fork, a residual). Costs per op type scaled per
    device with ±30% jitter; the NPU runs no softmax/norm/activation; ``repeat`` gives every
    block the same costs, as identical layers have. ``mask`` adds an attention mask computed
    from a second input (``mask`` → ``mask2``) and fed to every block's ``qk``."""
    base = {"ln": 1.0, "q": 4.0, "k": 4.0, "v": 4.0, "rope": 0.7, "qk": 3.0, "sm": 1.5, "av": 3.0,
            "proj": 4.0, "add": 0.5, "up": 8.0, "gate": 8.0, "act": 1.0, "mul": 0.5, "down": 8.0}
    speed = {"cpu": 1.0, "gpu0": 0.25, "gpu1": 0.35, "npu": 0.3}
    rng = random.Random(seed)
    g = nx.DiGraph()
    g.add_node("embed", cost={d: 0.5 for d in devices if d != "npu"}, op="embed", mem=1.0)
    jitter = None

    def add(name, op, *inputs, nbytes=4e3):
        cost = {d: round(base[op] * speed[d] * jitter[op, d], 3) for d in devices
                if not (d == "npu" and op in ("sm", "ln", "act"))}
        g.add_node(name, cost=cost, op=op, mem=1.0)
        g.add_edges_from((u, name) for u in inputs)
        for u in inputs:
            g.edges[u, name]["bytes"] = nbytes
        return name

    x = "embed"
    for b in range(blocks):
        if jitter is None or not repeat:
            jitter = {(op, d): rng.uniform(0.7, 1.3) for op in base for d in devices}
        p = f"b{b}."
        h = add(p + "ln1", "ln", x)
        q, k, v = (add(p + o, o, h) for o in "qkv")
        s = add(p + "qk", "qk", add(p + "rq", "rope", q), add(p + "rk", "rope", k), nbytes=2e3)
        a = add(p + "av", "av", add(p + "sm", "sm", s, nbytes=2e3), v, nbytes=2e3)
        r = add(p + "add1", "add", add(p + "proj", "proj", a), x)
        h = add(p + "ln2", "ln", r)
        m = add(p + "mul", "mul", add(p + "up", "up", h), add(p + "act", "act", add(p + "gate", "gate", h)),
                nbytes=8e3)
        x = add(p + "add2", "add", add(p + "down", "down", m, nbytes=8e3), r)
    if mask:
        g.add_node("mask", cost={d: 0.3 for d in devices if d != "npu"}, op="mask", mem=1.0)
        g.add_node("mask2", cost={d: 0.2 for d in devices}, op="mask", mem=1.0)
        g.add_edge("mask", "mask2", bytes=1e3)
        g.add_edges_from(("mask2", f"b{b}.qk", {"bytes": 4e3}) for b in range(blocks))
    return Problem(g, list(devices), default_link=Link(0.2, 2e4))


def fork_join_chain(n_blocks: int = 25, block: int = 20, devices: int = 4, seed: int = 0) -> Problem:
    """``n_blocks`` blocks of an entry, two parallel branches and a join; random costs, 10%
    refusals on devices 1–3, random edge bytes, links α=2e-5 s, β=1e10 B/s."""
    rng = random.Random(seed)
    names = [f"d{i}" for i in range(devices)]
    g = nx.DiGraph()
    prev, k = None, 0
    for _ in range(n_blocks):
        entry = f"n{k}"
        k += 1
        g.add_node(entry)
        if prev is not None:
            g.add_edge(prev, entry)
        half = (block - 2) // 2
        tails = []
        for _ in range(2):
            last = entry
            for _ in range(half):
                v = f"n{k}"
                k += 1
                g.add_edge(last, v)
                last = v
            tails.append(last)
        join = f"n{k}"
        k += 1
        for t in tails:
            g.add_edge(t, join)
        prev = join
    for v in g.nodes:
        base = rng.uniform(1e-4, 1e-3)
        g.nodes[v]["cost"] = {d: (base * rng.uniform(0.3, 3.0) if (i == 0 or rng.random() > 0.1) else INF)
                              for i, d in enumerate(names)}
    for u, v in g.edges:
        g.edges[u, v]["bytes"] = rng.uniform(1e3, 1e6)
    links = {(a, b): Link(2e-5, 1e10) for a in names for b in names if a != b}
    return Problem(g, names, links)
