"""MetaSchedule tuning for ``cpu``: a tiny tuned build against the interpreter, its records in
the cache directory and reused by a second build; hand-written kernels and symbolic shapes
left alone; where the database lives; and the bad inputs."""
from __future__ import annotations

import time

import pytest
import torch

tvm = pytest.importorskip("tvm")

import qcompile  # noqa: E402
from qcompile.backends.tvm import metaschedule as msq  # noqa: E402
from qcompile.errors import ConfigError  # noqa: E402
from qcompile.interpreter import Interpreter  # noqa: E402

TRIALS = 4  # per workload: a few seconds on two busy cores


class Head(torch.nn.Module):
    """A linear (a hand-written kernel, not tuned) feeding what Relax legalizes and fuses
    (tuned): softmax · 2 + a row sum, and a transpose."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 64)

    def forward(self, x):
        h = self.fc(x)
        return torch.softmax(h, -1) * 2 + h.sum(-1, keepdim=True), (h * h).transpose(0, 1) + 1


def _records(root) -> int:
    return sum(1 for line in (root / "database_tuning_record.json").read_text().splitlines()
               if line.strip())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    if not msq._serialization_works():
        import tvm_ffi
        pytest.skip(f"TVM's JSON serialization crashes with apache-tvm-ffi {tvm_ffi.__version__}"
                    " (MetaSchedule needs it): pin apache-tvm-ffi<0.1.15")
    return tmp_path / "cache"


def test_tuned_build_matches_and_its_records_are_reused(cache):
    model, x = Head().eval(), torch.randn(8, 32)
    t0 = time.perf_counter()
    cm = qcompile.compile(model, "cpu", example_inputs=(x,), tune_trials=TRIALS)
    first = time.perf_counter() - t0
    ref = Interpreter(cm.graph).run(x)
    for got, want in zip(cm(x), ref):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    report = cm._exec.report
    # the fused softmax chain, the row sum, the transpose chain; not the dense kernel
    assert report["metaschedule.tuned"] == 3 and report["metaschedule.cached"] == 0
    assert report["metaschedule.applied"] == 3
    (root,) = [p for p in (cache / "metaschedule").iterdir() if p.is_dir()]
    assert root == msq.database_dir(tvm.target.Target(_cpu_target()))
    n = _records(root)
    # at most TRIALS searched per workload, plus the rule-based schedule of each
    assert 3 < n <= 3 * (TRIALS + 1)
    workloads = (root / "database_workload.json").read_text()
    assert "is_scheduled" not in workloads  # no hand-written kernel was a task

    t0 = time.perf_counter()
    cm2 = qcompile.compile(model, "cpu", example_inputs=(x,), tune_trials=TRIALS)
    second = time.perf_counter() - t0
    assert cm2._exec.report["metaschedule.tuned"] == 0
    assert cm2._exec.report["metaschedule.cached"] == 3
    assert _records(root) == n  # nothing searched again
    assert second < first
    for got, want in zip(cm2(x), ref):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def _cpu_target():
    from qcompile.backends.tvm import _tvm_target
    return _tvm_target("cpu")[0]


def test_symbolic_shapes_are_not_tuned(cache):
    """A dynamic batch has no shape to measure: the rules schedule it, nothing is searched."""
    model, x = Head().eval(), torch.randn(8, 32)
    dyn = ({0: torch.export.Dim("batch", min=2, max=64)},)
    cm = qcompile.compile(model, "cpu", example_inputs=(x,), dynamic_shapes=dyn,
                          tune_trials=TRIALS)
    assert cm._exec.report.get("metaschedule.tuned", 0) == 0
    y = torch.randn(5, 32)
    for got, want in zip(cm(y), Interpreter(cm.graph).run(y)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_database_dir_follows_the_cache_variables(monkeypatch, tmp_path):
    tgt = _cpu_target()
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "q"))
    d = msq.database_dir(tgt)
    assert d.parent == tmp_path / "q" / "metaschedule"
    assert d.name.startswith("llvm-") and f"-{tgt.attrs['num-cores']}c-" in d.name
    monkeypatch.delenv("QCOMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert msq.database_dir(tgt) == tmp_path / "x" / "qcompile" / "metaschedule" / d.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert msq.cache_dir() == tmp_path / "h" / ".cache" / "qcompile"
    other = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1})
    assert msq.database_dir(other).name != d.name  # records are per target


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True])
def test_bad_trial_counts_are_config_errors(bad, tiny_mlp):
    with pytest.raises(ConfigError, match="tune_trials must be a non-negative integer"):
        qcompile.compile(tiny_mlp, "cpu", example_inputs=(torch.randn(2, 8),), tune_trials=bad)
    with pytest.raises(ConfigError, match="non-negative"):
        msq.check_trials(bad)


@pytest.mark.parametrize("target", ["reference", "cuda", "cpu-aarch64"])
def test_targets_that_cannot_be_tuned_say_so(target, tiny_mlp):
    with pytest.raises(ConfigError, match="cannot be tuned") as e:
        qcompile.compile(tiny_mlp, target, example_inputs=(torch.randn(2, 8),), tune_trials=4)
    assert "cpu" in e.value.hint
    with pytest.raises(ConfigError, match="not available"):
        msq.check_trials(4, target)


def test_zero_trials_builds_as_before(tiny_mlp):
    cm = qcompile.compile(tiny_mlp, "cpu", example_inputs=(torch.randn(2, 8),), tune_trials=0)
    assert not any(k.startswith("metaschedule.") for k in cm._exec.report)


def test_a_tvm_without_json_serialization_is_a_backend_error(monkeypatch, tiny_mlp):
    """apache-tvm-ffi 0.1.15 segfaults in TVM 0.27's save_json: tuning says so, not crashes."""
    from qcompile.errors import BackendError
    monkeypatch.setattr(msq, "_serialization_works", lambda: False)
    with pytest.raises(BackendError, match="serialization") as e:
        qcompile.compile(tiny_mlp, "cpu", example_inputs=(torch.randn(2, 8),), tune_trials=2)
    assert "apache-tvm-ffi<0.1.15" in e.value.hint
