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
        if len(loops) > 1:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(outer)
        n = extent(sch, inner)
        if n is not None and n >= lanes and n % lanes == 0:
            o, v = sch.split(inner, [None, lanes])
            sch.vectorize(v)
            if len(loops) == 1:
                sch.parallel(o)
        elif len(loops) == 1 and (n is None or n >= 4 * lanes):
            o, v = sch.split(inner, [None, 16 * lanes])
            sch.parallel(o)

    return [dl.cpu.Reduction(), dl.cpu.GEMV(), Injective(), Fallback()]


def schedule_cpu_module(mod, target, info):
    """Schedule every PrimFunc of ``mod`` that is not scheduled yet."""
    from tvm.s_tir import dlight as dl
    with target:
        return dl.ApplyDefaultSchedule(*_rules(info))(mod)
