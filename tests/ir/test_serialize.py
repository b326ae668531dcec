"""Graph <-> graph.json + params.safetensors: round trips keep the printout, the numbers and the
quantization annotations, and neither file is a pickle."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

import qcompile
from qcompile.errors import ArtifactError
from qcompile.interpreter import Interpreter
from qcompile.ir import (
    Granularity,
    Graph,
    QuantSpec,
    graph_from_json,
    graph_to_json,
    load_graph,
    save_graph,
    verify,
)


def _quantized(g: Graph) -> Graph:
    s = g.add_constant("act_scale", torch.tensor(0.05))
    z = g.add_constant("act_zp", torch.tensor(3, dtype=torch.int32))
    g.nodes[1].output.quant = QuantSpec("uint8", scale=s.name, zero_point=z.name)
    ws = g.add_constant("w2_scale", torch.full((4, 4), 0.02))
    g.constant_value("w2").quant = QuantSpec("int4", Granularity.PER_GROUP, axis=1, group_size=4,
                                             scale=ws.name)
    return g


def test_round_trip_keeps_printout_and_outputs(mlp_graph, tmp_path):
    g = _quantized(mlp_graph)
    save_graph(g, tmp_path)
    back = load_graph(tmp_path)
    verify(back)
    assert str(back) == str(g)
    x = torch.randn(3, 8)
    for a, b in zip(Interpreter(g).run(x), Interpreter(back).run(x)):
        assert torch.equal(a, b)
    assert not torch.equal(Interpreter(g).run(x)[0], Interpreter(g, fake_quant=False).run(x)[0])


def test_quant_specs_survive(mlp_graph, tmp_path):
    g = _quantized(mlp_graph)
    save_graph(g, tmp_path)
    back = load_graph(tmp_path)
    assert back.value("act").quant == g.value("act").quant
    w2 = back.constant_value("w2").quant
    assert w2 == QuantSpec("int4", "per_group", axis=1, group_size=4, scale="w2_scale")
    assert w2.granularity is Granularity.PER_GROUP
    assert torch.equal(back.constants["act_zp"], torch.tensor(3, dtype=torch.int32))


def test_captured_model_round_trip(tiny_mlp, tmp_path):
    x = torch.randn(2, 8)
    g = qcompile.capture(tiny_mlp, (x,))
    save_graph(g, tmp_path)
    back = load_graph(tmp_path)
    assert str(back) == str(g)
    torch.testing.assert_close(Interpreter(back).run(x)[0], tiny_mlp(x), rtol=0, atol=1e-6)
    assert graph_to_json(back) == graph_to_json(g)


def test_params_file_is_safetensors_not_pickle(mlp_graph, tmp_path):
    save_graph(mlp_graph, tmp_path)
    raw = (tmp_path / "params.safetensors").read_bytes()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # pickle / torch.save zip
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert set(header) - {"__metadata__"} == set(mlp_graph.constants)
    assert header["w1"]["dtype"] == "F32" and header["w1"]["shape"] == [16, 8]
    with safe_open(str(tmp_path / "params.safetensors"), "pt") as f:
        assert set(f.keys()) == set(mlp_graph.constants)
        assert torch.equal(f.get_tensor("w2"), mlp_graph.constants["w2"])


def test_graph_json_is_plain_json(mlp_graph, tmp_path):
    save_graph(mlp_graph, tmp_path)
    text = (tmp_path / "graph.json").read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    d = json.loads(text, parse_constant=no_constants)
    assert d["format_version"] == 1 and d["name"] == "mlp"
    assert [n["op"] for n in d["nodes"]] == ["linear", "relu", "linear"]
    assert d["inputs"] == [{"name": "x", "type": {"shape": ["batch", 8], "dtype": "float32"}}]
    assert d["outputs"] == ["fc2"]
    assert graph_from_json(d, dict(mlp_graph.constants)).nodes[0].inputs[1].name == "w1"


def test_save_is_deterministic(mlp_graph, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_graph(mlp_graph, a)
    save_graph(mlp_graph.clone(), b)
    for f in ("graph.json", "params.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_bad_files_raise_artifact_error(mlp_graph, tmp_path):
    with pytest.raises(ArtifactError, match="cannot read graph"):
        load_graph(tmp_path)
    save_graph(mlp_graph, tmp_path)
    d = json.loads((tmp_path / "graph.json").read_text())
    with pytest.raises(ArtifactError, match="format version 7"):
        graph_from_json({**d, "format_version": 7}, {})
    with pytest.raises(ArtifactError, match="%w1"):
        graph_from_json(d, {k: v for k, v in mlp_graph.constants.items() if k != "w1"})
    d["nodes"][1]["inputs"] = ["nope"]
    with pytest.raises(ArtifactError, match="node act reads undefined value %nope"):
        graph_from_json(d, dict(mlp_graph.constants))
    (tmp_path / "graph.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        load_graph(tmp_path)
