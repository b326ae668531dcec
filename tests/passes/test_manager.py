"""PassManager: passes by name, timings, verification around passes, failures named once as
"in pass X after [A, B]", and IR dumps with QCOMPILE_DUMP."""
from __future__ import annotations

import pytest
import torch

from qcompile.errors import ConfigError, PassError, VerificationError
from qcompile.ir import Graph, TensorType
from qcompile.passes import PassManager, all_passes, get_pass, register_pass, run_passes
from qcompile.passes import manager as _manager


@pytest.fixture
def test_passes(monkeypatch):
    """Register throw-away passes; monkeypatch removes them after the test."""
    def identity(graph: Graph) -> Graph:
        return graph.clone()

    def boom(graph: Graph) -> Graph:
        raise RuntimeError("kaboom")

    def breaker(graph: Graph) -> Graph:
        g = graph.clone()
        g.nodes[0].outputs[0].type = TensorType((1,), "float32")  # a lie about a shape
        return g

    def scaled(graph: Graph, factor: float = 1.0) -> Graph:
        g = graph.clone()
        g.outputs = [g.add("mul", g.outputs[0], g.add_constant("k", torch.tensor(factor)))]
        return g

    for name, fn in {"t_a": identity, "t_b": identity, "t_boom": boom, "t_break": breaker,
                     "t_scale": scaled}.items():
        monkeypatch.setitem(_manager._PASSES, name, fn)
        fn.pass_name = name
    return _manager._PASSES


def test_builtin_passes_registered():
    assert {"canonicalize", "fold_constants"} <= set(all_passes())
    assert get_pass("fold_constants").pass_name == "fold_constants"


def test_runs_by_list_and_comma_string(mlp_graph, test_passes):
    for pipeline in (["t_a", "fold_constants", "t_b"], " t_a, fold_constants ,t_b,"):
        pm = PassManager(pipeline)
        assert pm.pipeline == ["t_a", "fold_constants", "t_b"]
        out = pm.run(mlp_graph)
        assert out is not mlp_graph and str(out) == str(mlp_graph)
        assert [r.name for r in pm.records] == ["t_a", "fold_constants", "t_b"]
        assert all(r.seconds >= 0 and r.nodes_before == r.nodes_after == 3 for r in pm.records)


def test_options_reach_the_pass(mlp_graph, test_passes):
    pm = PassManager(["t_scale"], options={"t_scale": {"factor": 3.0}})
    out = pm.run(mlp_graph)
    assert out.nodes[-1].op == "mul" and float(out.constants["k"]) == 3.0
    assert pm.records[0].nodes_before == 3 and pm.records[0].nodes_after == 4


def test_unknown_pass_lists_known_ones(test_passes):
    with pytest.raises(ConfigError) as ei:
        PassManager("fold_constants,nope")
    msg = str(ei.value)
    assert "unknown pass 'nope'" in msg and "canonicalize" in msg and "fold_constants" in msg


def test_failing_pass_names_itself_and_those_before(mlp_graph, test_passes):
    with pytest.raises(PassError) as ei:
        run_passes(mlp_graph, ["t_a", "t_b", "t_boom", "fold_constants"])
    msg = str(ei.value)
    assert msg.startswith("in pass t_boom after [t_a, t_b]: RuntimeError: kaboom")
    assert isinstance(ei.value.__cause__, RuntimeError)
    with pytest.raises(PassError, match=r"in pass t_boom \(first pass\)"):
        run_passes(mlp_graph, ["t_boom"])


def test_pass_error_is_wrapped_once(mlp_graph, test_passes, monkeypatch):
    def inner(graph):
        return run_passes(graph, ["t_boom"])  # a pass that runs a pipeline itself

    monkeypatch.setitem(_manager._PASSES, "t_outer", inner)
    with pytest.raises(PassError) as ei:
        run_passes(mlp_graph, ["t_a", "t_outer"])
    assert str(ei.value).count("in pass") == 1


def test_pass_that_breaks_the_graph_is_caught(mlp_graph, test_passes):
    with pytest.raises(PassError) as ei:
        PassManager(["t_a", "t_break", "t_b"], verify=True).run(mlp_graph)
    msg = str(ei.value)
    assert "pass t_break after [t_a] left a malformed graph" in msg and "node 'fc1'" in msg
    assert isinstance(ei.value.__cause__, VerificationError)
    out = PassManager(["t_break"], verify=False).run(mlp_graph)  # without checks it goes through
    assert out.nodes[0].output.type == TensorType((1,), "float32")


def test_verification_is_on_under_pytest(mlp_graph, test_passes):
    assert PassManager(["t_a"]).verify is True
    bad = mlp_graph
    bad.nodes[1], bad.nodes[2] = bad.nodes[2], bad.nodes[1]
    with pytest.raises(PassError, match="the input graph left a malformed graph"):
        PassManager(["t_a"]).run(bad)


def test_dump_writes_one_file_per_pass(mlp_graph, test_passes, monkeypatch, tmp_path):
    d = tmp_path / "dump"
    monkeypatch.setenv("QCOMPILE_DUMP", str(d))
    out = run_passes(mlp_graph, ["t_a", "fold_constants", "t_scale"])
    files = sorted(p.name for p in d.iterdir())
    assert files == ["00_t_a.txt", "01_fold_constants.txt", "02_t_scale.txt"]
    assert (d / "02_t_scale.txt").read_text() == str(out) + "\n"
    assert "= mul(" not in (d / "01_fold_constants.txt").read_text()


def test_no_dump_without_env(mlp_graph, test_passes, monkeypatch, tmp_path):
    monkeypatch.delenv("QCOMPILE_DUMP", raising=False)
    monkeypatch.chdir(tmp_path)
    pm = PassManager(["t_a"])
    pm.run(mlp_graph)
    assert pm.dump_dir is None and list(tmp_path.iterdir()) == []


def test_register_pass_twice_is_an_error(monkeypatch):
    monkeypatch.setattr(_manager, "_PASSES", dict(_manager._PASSES))

    @register_pass("t_twice")
    def first(graph):
        return graph

    assert register_pass("t_twice")(first) is first  # re-registering the same function is fine
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("t_twice")(lambda g: g)
