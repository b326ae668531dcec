"""A readable, deterministic text listing of a Graph (``print(graph)``)."""
from __future__ import annotations

__all__ = ["print_graph", "format_attrs"]


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_attrs(attrs: dict) -> str:
    items = [f"{k}={_fmt(v)}" for k, v in sorted(attrs.items()) if v is not None]
    return "{" + ", ".join(items) + "}" if items else ""


def _val(v) -> str:
    q = f" ~{v.quant}" if v.quant is not None else ""
    sp = f" {v.sparsity}" if getattr(v, "sparsity", None) is not None else ""
    return f"%{v.name}: {v.type}{q}{sp}"


def print_graph(graph, *, provenance: bool = True) -> str:
    lines = [f"graph {graph.name}(" + ", ".join(_val(v) for v in graph.inputs) + ") {"]
    for name in graph.constants:
        lines.append(f"  const {_val(graph.constant_value(name))}")
    for n in graph.nodes:
        args = ", ".join("None" if v is None else f"%{v.name}" for v in n.inputs)
        outs = ", ".join(_val(o) for o in n.outputs)
        line = f"  {outs} = {n.op}({args}){format_attrs(n.attrs)}"
        if provenance and n.provenance.module:
            line += f"  # {n.provenance.module}"
        lines.append(line)
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
