"""Optional MetaSchedule tuning for target ``cpu``, cached per workload (shapes included).

**What is tuned.** The PrimFuncs that no hand-written kernel covers: what Relax legalizes and
FuseOps/FuseTIR fuse (elementwise chains, transposes and reshapes, reductions), the functions
``schedule.py``'s rules would otherwise schedule. Hand-written kernels (dense, attention, norms,
activations, quantized linears: marked ``tirx.is_scheduled`` by ``lower.py``) are *not* tuned;
their schedules are the kernels themselves.

**How.** :func:`tune_cpu_module` runs between FuseTIR and :func:`.schedule.schedule_cpu_module`
(MetaSchedule starts from unscheduled TIR, and dlight marks what it schedules as scheduled).
Per workload, MetaSchedule's evolutionary search measures up to ``trials`` candidates (a random
cost model unless ``xgboost`` is installed). The rule-based schedule of ``schedule.py`` is
measured the same way and stored as one more record, so tuning never picks a schedule slower
than the untuned build's. The best record of each workload is applied with
``relax.transform.MetaScheduleApplyDatabase``; what has no record is left to the rules.
Candidates are built and timed in this process (``_ms_support.py``: no worker pool, no
start-up cost, no ``psutil``); integer inputs are zeros so gathers stay in bounds.
MetaSchedule needs TVM's JSON serialization, which segfaults with TVM 0.27.0.post1 and
apache-tvm-ffi 0.1.15 (0.1.14 works): that is checked first, and is a BackendError.

**Where records live.** A MetaSchedule JSON database (``database_workload.json``,
``database_tuning_record.json``) in ``<cache>/metaschedule/<target key>/`` (:func:`database_dir`),
where ``<cache>`` is ``$QCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/qcompile``, else
``~/.cache/qcompile``, and the key names the TVM version and the target (CPU, features, cores).
A workload that has records is never tuned again: a second build with the same shapes only
applies them. Delete the folder to tune afresh. Functions with symbolic shapes (a dynamic
batch) are not tuned: MetaSchedule measures one concrete shape.

Tuning is slow on few cores and is never on by default (``tune_trials=0``): not in CI.
Progress is a tqdm bar on a terminal; MetaSchedule's own log goes to the console only if the
``tvm.s_tir.meta_schedule`` logger's level was set (``INFO``) before the build.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from qcompile.backends.tvm._ms_support import cpu_tensor_intrinsics, measurers, progress, quiet_logs
from qcompile.errors import BackendError, ConfigError

__all__ = ["tune_cpu_module", "check_trials", "cache_dir", "database_dir", "TUNABLE"]

#: the targets MetaSchedule tuning is available for (it measures on this machine)
TUNABLE = ("cpu",)
SCHEDULED = "tirx.is_scheduled"


def check_trials(trials, target: str = "cpu") -> int:
    """``trials`` as a non-negative int (0: no tuning), or a ConfigError."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"tune_trials must be a non-negative integer, got {trials!r}",
                          hint="0 (the default) builds without tuning; try 64 per workload")
    if trials and target not in TUNABLE:
        raise ConfigError(f"MetaSchedule tuning is not available for target {target!r}",
                          hint=f"tune for {', '.join(map(repr, TUNABLE))} (it measures on this "
                               "machine), or pass tune_trials=0")
    return trials


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE`` or ``$XDG_CACHE_HOME/qcompile`` (default ``~/.cache/qcompile``)."""
    env = os.environ.get("QCOMPILE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "qcompile"


def database_dir(target) -> Path:
    """Where the records for ``target`` (a ``tvm.target.Target``) live."""
    import tvm
    ident = f"tvm-{tvm.__version__}|{target}"
    mcpu = str(target.attrs.get("mcpu", "generic"))
    cores = int(target.attrs.get("num-cores", 0))
    key = f"{target.kind.name}-{mcpu}-{cores}c-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    return cache_dir() / "metaschedule" / key


@lru_cache(maxsize=None)
def _serialization_works() -> bool:
    """Whether TVM's JSON serialization (MetaSchedule's database and mutators use it) runs:
    TVM 0.27.0.post1 with apache-tvm-ffi 0.1.15 segfaults in it, so a child process tries it
    once per pair of versions (a success is remembered in the cache directory)."""
    import tvm
    import tvm_ffi
    stamp = cache_dir() / "metaschedule" / f"json-ok-tvm-{tvm.__version__}-ffi-{tvm_ffi.__version__}"
    if stamp.exists():
        return True
    code = "import tvm; tvm.ir.save_json(tvm.tirx.IntImm('int32', 1))"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        timeout=300).returncode == 0
    if ok:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    return ok


def _require_serialization():
    if not _serialization_works():
        import tvm_ffi
        raise BackendError(
            "MetaSchedule cannot run: TVM's JSON serialization crashes with apache-tvm-ffi "
            f"{tvm_ffi.__version__}", hint="install apache-tvm-ffi 0.1.14 "
            "(pip install 'apache-tvm-ffi<0.1.15'), or build without tuning (tune_trials=0)")


def _rule_schedule(func, target, rules):
    """The schedule ``schedule.py``'s rules give ``func`` (traced), or None."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - as dlight: a rule that fails does not apply
            sch = None
        if sch is not None:
            return sch[0] if isinstance(sch, list) else sch
    return None


def tune_cpu_module(mod, target, info, trials: int, *, target_name: str = "cpu",
                    report: dict | None = None):
    """Tune the unscheduled PrimFuncs of ``mod`` (a Relax module after FuseTIR; ``target`` a
    ``tvm.target.Target``, ``info`` its host CPU) with up to ``trials`` MetaSchedule trials per
    workload, unless the database already has records for it, and apply the best records.
    ``report`` (a lowering's report) gains ``metaschedule.tuned`` and ``.cached`` (workloads
    searched now, and those whose records were reused) and ``.applied`` (PrimFuncs given a
    record's schedule; the rules schedule the rest)."""
    check_trials(trials, target_name)
    if not trials:
        return mod
    _require_serialization()
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    root = database_dir(target)
    root.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(root), module_equality="structural")
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if _tunable(t.dispatched[0]["main"])]
    fresh = [t for t in tasks if db.query_tuning_record(t.dispatched[0], target, "main") is None]
    counts = {"tuned": len(fresh), "cached": len(tasks) - len(fresh)}
    if fresh:
        with tempfile.TemporaryDirectory(prefix="qcompile-ms-") as work, quiet_logs(work), \
                cpu_tensor_intrinsics():
            _tune(ms, fresh, target, info, trials, db, work)
    if tasks:
        before = _unscheduled(mod)
        with target, db, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        counts["applied"] = len(before - _unscheduled(mod))
    if report is not None:
        report.update({f"metaschedule.{k}": v for k, v in counts.items()})
    return mod


def _tunable(func) -> bool:
    """Not hand-scheduled, and every buffer shape concrete (MetaSchedule measures a shape)."""
    import tvm
    if bool(func.attrs.get(SCHEDULED, False)):
        return False
    shapes = [getattr(p, "shape", None) for p in func.params]
    return all(s is not None and all(isinstance(d, tvm.tirx.IntImm) for d in s) for s in shapes)


def _unscheduled(mod) -> set[str]:
    import tvm
    return {gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and not bool(f.attrs.get(SCHEDULED, False))}


def _tune(ms, tasks, target, info, trials, db, work):
    """Search ``tasks`` and commit their records (and the rule-based schedule's) to ``db``."""
    builder, runner = measurers(target)
    try:
        import xgboost  # noqa: F401
        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    population = max(16, min(512, 4 * trials))  # MetaSchedule's 512 costs seconds per task
    threads = int(target.attrs.get("num-cores", 1))
    contexts, weights = [], []
    logs = ms.logging.get_loggers_from_work_dir(work, [t.task_name for t in tasks])
    for t, logger, seed in zip(tasks, logs, ms.utils.fork_seed(0, n=len(tasks))):
        contexts.append(ms.TuneContext(
            mod=t.dispatched[0], target=target, task_name=t.task_name, logger=logger,
            rand_state=seed, num_threads=threads, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population, init_min_unmeasured=min(50, population),
                genetic_num_iters=2)).clone())
        weights.append(float(t.weight))
    callback, bar = progress(trials * len(tasks))
    try:
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work,
                      max_trials_global=trials * len(tasks), max_trials_per_task=trials,
                      num_trials_per_iter=min(trials, 16), builder=builder, runner=runner,
                      database=db, cost_model=cost_model,
                      measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                         ms.measure_callback.UpdateCostModel(), callback])
    finally:
        bar.close()
    _commit_rule_schedules(ms, tasks, target, info, db, builder, runner)


def _commit_rule_schedules(ms, tasks, target, info, db, builder, runner):
    """Measure each task's rule-based schedule and store it as a record, so that the best
    record is never slower than what the untuned build runs."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from qcompile.backends.tvm.schedule import _rules  # what schedule_cpu_module applies
    rules = _rules(info)
    for t in tasks:
        wl_mod = t.dispatched[0]
        with target:
            sch = _rule_schedule(wl_mod["main"], target, rules)
        if sch is None or sch.trace is None:
            continue
        (b,) = builder.build([BuilderInput(sch.mod, target)])
        if b.error_msg is not None:
            continue
        args = ArgInfo.from_prim_func(wl_mod["main"])
        (fut,) = runner.run([RunnerInput(b.artifact_path, "llvm", args)])
        res = fut.result()
        if res.error_msg is not None or not res.run_secs:
            continue
        db.commit_tuning_record(ms.database.TuningRecord(
            trace=sch.trace, workload=db.commit_workload(wl_mod),
            run_secs=[float(s) for s in res.run_secs], target=target, args_info=args))
