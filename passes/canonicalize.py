"""Canonicalize: rebuild high-level ops that frontends see decomposed, so later passes can
match them — RMSNorm (Zhang & Sennrich 2019, eq. 4) from pow/mean/add/rsqrt/mul and
rotary embedding (Su et al. 2021, eq. 34, half-split form) from the rotate_half pattern.

Rules are ``pattern → check → rewrite`` functions over one anchor node; a rule fires only
when every intermediate value has no other reader, so outputs are unchanged.
Requires: a verified graph. Guarantees: same outputs (up to fp rounding order).
"""
from __future__ import annotations

from qcompile.ir.graph import Graph, Node, Value
from qcompile.passes.manager import register_pass

__all__ = ["canonicalize"]


class _Ctx:
    def __init__(self, g: Graph):
        self.g = g
        self.users = g.users()
        self.outputs = {id(v) for v in g.outputs}

    def private(self, v: Value) -> bool:
        """Read by exactly one node and not a graph output."""
        return len(self.users.get(v, [])) == 1 and id(v) not in self.outputs

    def scalar(self, v: Value | None):
        if v is None or not self.g.is_constant(v) or self.g.constants[v.name].numel() != 1:
            return None
        return float(self.g.constants[v.name].reshape(()))


def _prod(v: Value | None, op: str) -> Node | None:
    return v.producer if v is not None and v.producer is not None and v.producer.op == op else None


def _rms_norm(c: _Ctx, rsqrt: Node):
    """x * rsqrt(mean(x**2, -1, keepdim) + eps) [* w]  →  rms_norm(x, w, eps)."""
    add = _prod(rsqrt.inputs[0], "add")
    if add is None:
        return None
    mean = _prod(add.inputs[0], "mean") or _prod(add.inputs[1], "mean")
    eps = c.scalar(add.inputs[1] if mean is _prod(add.inputs[0], "mean") else add.inputs[0])
    if mean is None or eps is None or mean.attrs["axes"] != [-1] and mean.attrs["axes"] != [
            mean.inputs[0].type.rank - 1] or not mean.attrs["keepdim"]:
        return None
    pw = _prod(mean.inputs[0], "pow")
    if pw is None or c.scalar(pw.inputs[1]) != 2.0:
        return None
    x = pw.inputs[0]
    muls = c.users.get(rsqrt.output, [])
    if len(muls) != 1 or muls[0].op != "mul" or x not in muls[0].inputs:
        return None
    normed = muls[0]
    if not all(c.private(v) for v in (pw.output, mean.output, add.output, rsqrt.output)):
        return None
    out, weight, last = normed.output, None, normed
    nxt = c.users.get(out, [])
    if c.private(out) and nxt[0].op == "mul":
        other = [v for v in nxt[0].inputs if v is not out][0]
        if c.g.is_constant(other) and other.type.rank == 1 and other.shape == x.shape[-1:]:
            weight, last = other, nxt[0]
    new = c.g.add_node("rms_norm", [x, weight], {"eps": eps, "normalized_ndim": 1},
                       name=f"{normed.name}_rms_norm", provenance=normed.provenance)
    return last, new


def _rotary(c: _Ctx, add: Node):
    """x*cos + concat(-x[..., h:], x[..., :h])*sin  →  rotary(x, cos, sin)."""
    m0, m1 = _prod(add.inputs[0], "mul"), _prod(add.inputs[1], "mul")
    if m0 is None or m1 is None:
        return None
    for rot_mul, cos_mul in ((m1, m0), (m0, m1)):
        for k in (0, 1):
            cat = _prod(rot_mul.inputs[k], "concat")
            if cat is None or len(cat.inputs) != 2:
                continue
            sin = rot_mul.inputs[1 - k]
            neg = _prod(cat.inputs[0], "neg")
            hi = _prod(neg.inputs[0], "slice") if neg else None
            lo = _prod(cat.inputs[1], "slice")
            if hi is None or lo is None or hi.inputs[0] is not lo.inputs[0]:
                continue
            x = hi.inputs[0]
            half = x.shape[-1] // 2 if isinstance(x.shape[-1], int) else None
            last = x.type.rank - 1
            if half is None or cat.attrs["axis"] % x.type.rank != last:
                continue
            if not (hi.attrs["axis"] % x.type.rank == last == lo.attrs["axis"] % x.type.rank
                    and hi.attrs["start"] == half and lo.attrs["start"] == 0
                    and lo.attrs["end"] == half and hi.attrs["step"] == lo.attrs["step"] == 1):
                continue
            if x not in cos_mul.inputs:
                continue
            cos = [v for v in cos_mul.inputs if v is not x][0] if cos_mul.inputs.count(x) == 1 \
                else None
            if cos is None or not all(c.private(v) for v in (
                    rot_mul.output, cos_mul.output, cat.output, neg.output)):
                continue
            new = c.g.add_node("rotary", [x, cos, sin], name=f"{add.name}_rotary",
                               provenance=add.provenance)
            return add, new
    return None


_RULES = {"rsqrt": _rms_norm, "add": _rotary}


@register_pass("canonicalize")
def canonicalize(graph: Graph) -> Graph:
    g = graph.clone()
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            rule = _RULES.get(node.op)
            if rule is None or node not in g.nodes:
                continue
            c = _Ctx(g)
            hit = rule(c, node)
            if hit is None:
                continue
            old_last, new = hit
            g.nodes.remove(new)
            if new.output.type.shape != old_last.output.type.shape and not new.output.type.same_as(
                    old_last.output.type):
                continue
            g.nodes.insert(g.nodes.index(old_last), new)
            g.replace_uses(old_last.output, new.output)
            g.remove_dead()
            changed = True
    return g
