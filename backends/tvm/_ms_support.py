"""What MetaSchedule needs around it to tune in this process, quickly and quietly: an
in-process builder and runner, the CPU tensor intrinsics without the CUDA ones, its log kept
off the console, and a tqdm progress bar (used by :mod:`.metaschedule`)."""
from __future__ import annotations

import contextlib
import logging
import sys
import time

__all__ = ["measurers", "cpu_tensor_intrinsics", "quiet_logs", "progress"]

_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def cpu_tensor_intrinsics():
    """MetaSchedule imports ``tvm.s_tir.tensor_intrin``, whose CUDA module parses hundreds of
    TVMScript intrinsics (40 s on two cores). CPU tuning needs only the x86 and Arm ones, so
    while tuning the package stands in unexecuted (its submodules still import), and is
    dropped again afterwards so that a later plain import runs it whole."""
    import importlib.util

    import tvm.s_tir
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    spec = importlib.util.find_spec(name)
    sys.modules[name] = pkg = importlib.util.module_from_spec(spec)
    tvm.s_tir.tensor_intrin = pkg
    try:
        import tvm.s_tir.tensor_intrin.arm_cpu  # noqa: F401
        import tvm.s_tir.tensor_intrin.x86  # noqa: F401
        yield
    finally:
        if sys.modules.get(name) is pkg:
            del sys.modules[name]
            del tvm.s_tir.tensor_intrin


@contextlib.contextmanager
def quiet_logs(work: str):
    """MetaSchedule's console log at WARNING unless the user set its logger's level; its
    file handlers (in the temporary ``work``) closed afterwards."""
    log = logging.getLogger(_LOGGER)
    level = log.level
    if level == logging.NOTSET:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
        for lg in [log, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                          if n.startswith(_LOGGER + "."))]:
            for h in list(lg.handlers):
                if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(work):
                    lg.removeHandler(h)
                    h.close()


def measurers(target, number: int = 3, repeat: int = 3, min_repeat_ms: int = 10):
    """An in-process MetaSchedule builder and runner (``tvm.build`` and ``time_evaluator``).
    MetaSchedule's LocalBuilder and LocalRunner start worker processes, which need ``psutil``
    and import every tensor intrinsic (40 s here, past their 30 s timeout); for small CPU
    functions building and timing in this process is quicker. A candidate that crashes would
    take the build down with it; MetaSchedule's CPU candidates are bounds-checked by its
    postprocessors, and integer inputs are zeros."""
    import numpy as np
    import tvm
    from tvm.driver import build as tvm_build
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    built: dict[str, object] = {}

    @derived_object
    class Builder(PyBuilder):
        def build(self, build_inputs):
            out = []
            for inp in build_inputs:
                try:
                    m = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                    key = f"in-process-{len(built)}-{time.perf_counter_ns()}"
                    built[key] = tvm_build(m, target=inp.target)
                    out.append(BuilderResult(key, None))
                except Exception as e:  # noqa: BLE001 - a candidate that fails is recorded
                    out.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return out

    @derived_object
    class Runner(PyRunner):
        def run(self, runner_inputs):
            dev = tvm.cpu(0)
            out = []
            for inp in runner_inputs:
                rt = built.pop(str(inp.artifact_path), None)
                try:
                    args = [_tensor(np, tvm, a.as_json(), dev) for a in inp.args_info]
                    ev = rt.time_evaluator(rt.entry_name, dev, number=number, repeat=repeat,
                                           min_repeat_ms=min_repeat_ms)
                    out.append(LocalRunnerFuture(res=[float(s) for s in ev(*args).results],
                                                 error_message=None))
                except Exception as e:  # noqa: BLE001
                    out.append(LocalRunnerFuture(res=None, error_message=f"{e}"))
            return out

    return Builder(), Runner()


def _tensor(np, tvm, info, dev):
    """A measurement input: normal floats; zeros for integers (gather indices stay in bounds);
    dtypes numpy lacks (bfloat16, fp8, int4) left uninitialised: values do not change the
    run time of these loop nests."""
    _, dtype, shape = info
    shape = [int(s) for s in shape]
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        return tvm.runtime.empty(shape, dtype, dev)
    if np_dtype.kind == "f":
        return tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape)
                                  .astype(np_dtype), dev)
    return tvm.runtime.tensor(np.zeros(shape, dtype=np_dtype), dev)


def progress(total: int):
    """A MetaSchedule measure callback that advances a tqdm bar (shown on terminals only)."""
    from tqdm import tqdm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    bar = tqdm(total=total, desc="metaschedule", unit="trial", disable=None, leave=False)

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            bar.update(len(measure_candidates))

    return Progress(), bar
