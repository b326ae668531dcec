"""Rule-based CPU schedules for the PrimFuncs that no hand-written kernel covers (what Relax
legalizes and FuseOps/FuseTIR fuse: elementwise chains, reshapes, reductions such as softmax
and norms). TVM's default CPU pipeline leaves every loop nest serial and scalar
(reference/tvm.md: MiniLM 16.3 s against torch's 0.18 s), so each function gets a rule:

- dlight's ``cpu.Reduction`` (softmax / norms: rows in parallel, every block computed at the
  row loop, vectorised) and ``cpu.GEMV``;
- ``Injective`` here: producers inlined, the outer loops fused and run in parallel, the
  innermost loop vectorised over the vector width;
- ``Fallback`` here: the leading spatial loops of every block in parallel.

Functions marked ``tirx.is_scheduled`` (the hand-written kernels) are left as they are.
"""
from __future__ import annotations

__all__ = ["schedule_cpu_module", "SCHEDULED"]

SCHEDULED = "tirx.is_scheduled"


def _rules(info):
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule

    lanes = info.lanes32 if info is not None else 4

    def extent(sch, loop):
        e = sch.get(loop).extent
        return int(e.value) if isinstance(e, tirx.IntImm) else None

    class Injective(ScheduleRule):
        def apply(self, func, target, _tunable):
            from tvm.s_tir import Schedule
            sch = Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(b.is_injective() for b in infos):
                return None
            for b in infos[:-1]:
                try:
                    sch.compute_inline(b.block_rv)
                except Exception:  # noqa: BLE001 - kept as its own nest
                    pass
            out = sch.get_child_blocks(sch.get_sblock("root"))
            for blk in out:
                _parallel_vectorize(sch, blk)
            return sch

    class Fallback(ScheduleRule):
        def apply(self, func, target, _tunable):
            from tvm.s_tir import Schedule
            sch = Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            for b in infos:
                lead = []
                for it in b.iters:
                    if it.kind != "S":
                        break
                    lead.append(it.loop_rv)
                if lead:
                    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
            return sch

    def _parallel_vectorize(sch, blk):
        loops = sch.get_loops(blk)
        if not loops:
            return
        inner = loops[-1]
        # bool buffers are bytes in memory but i1 in registers: vectorised stores of them
        # fail to lower, so their loops stay scalar (they are masks: small)
        has_bool = any(str(r.source.dtype) == "bool" for r in
                       list(sch.get(blk).reads) + list(sch.get(blk).writes))
        if len(loops) > 1:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(outer)
        n = extent(sch, inner)
        if not has_bool and n is not None and n >= lanes and n % lanes == 0:
            o, v = sch.split(inner, [None, lanes])
            sch.vectorize(v)
            if len(loops) == 1:
                sch.parallel(o)
        elif len(loops) == 1 and (n is None or n >= 4 * lanes):
            o, v = sch.split(inner, [None, 16 * lanes])
            sch.parallel(o)

    class NoBool(ScheduleRule):
        """A dlight rule, kept off functions with bool buffers: it vectorises their stores,
        which then fail to lower (bool is a byte in memory, i1 in a vector)."""

        def __init__(self, rule):
            self.rule = rule

        def apply(self, func, target, tunable):
            if _has_bool(func):
                return None
            return self.rule.apply(func, target, tunable)

    return [NoBool(dl.cpu.Reduction()), NoBool(dl.cpu.GEMV()), Injective(), Fallback()]


def _has_bool(func) -> bool:
    """Whether ``func`` has a bool parameter or intermediate buffer."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: nothing a dlight rule would take
        return False
    return any(str(r.source.dtype) == "bool" for b in blocks
               for r in list(sch.get(b).reads) + list(sch.get(b).writes))


def schedule_cpu_module(mod, target, info):
    """Schedule every PrimFunc of ``mod`` that is not scheduled yet."""
    from tvm.s_tir import dlight as dl
    with target:
        return dl.ApplyDefaultSchedule(*_rules(info))(mod)
