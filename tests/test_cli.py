"""The qcompile command: inspect, build, run, bench (targets reference, cpu and lut) and
info."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qcompile
from qcompile.cli import main
from qcompile.zoo import mlp


def test_inspect_prints_histogram(capsys):
    assert main(["inspect", "qcompile.zoo:mlp"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "3" in out and "float32[batch, 64]" in out


@pytest.mark.parametrize("target", ["reference", "cpu", "lut"])
def test_build_run_bench(tmp_path, capsys, target):
    if target != "reference":
        pytest.importorskip("tvm")
    art = tmp_path / "art"
    assert main(["build", "qcompile.zoo:mlp", "--target", target, "-o", str(art)]) == 0
    assert (art / "manifest.json").is_file()
    model, (x,), _ = mlp()
    np.save(tmp_path / "x.npy", x.numpy())
    assert main(["run", str(art), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "out")]) == 0
    got = np.load(tmp_path / "out" / "output_0.npy")
    with torch.no_grad():
        assert np.allclose(got, model(x).numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["bench", str(art), "--input", str(tmp_path / "x.npy"), "--repeat", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["repeat"] == 3


def test_build_quantized_with_config_and_calibration(tmp_path, capsys):
    (tmp_path / "q.toml").write_text('weights = "int4"\ngroup_size = 32\nalgorithm = "gptq"\n'
                                      'activations = "int8"\n')
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((6, 4, 64))
             .astype(np.float32))
    art = tmp_path / "art"
    assert main(["build", "qcompile.zoo:mlp", "-o", str(art), "--config", str(tmp_path / "q.toml"),
                 "--calibration", str(tmp_path / "cal.npz")]) == 0
    layers = qcompile.load(art).summary()["layers"]
    assert [ly["format"] for ly in layers] == ["int4 per_group(axis=1, g=32)"] * 3
    assert main(["build", "qcompile.zoo:mlp", "-o", str(tmp_path / "b"), "--config",
                 str(tmp_path / "q.toml")]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_build_with_a_mixed_precision_budget_and_labels(tmp_path, capsys):
    (tmp_path / "q.toml").write_text('group_size = 32\n[mixed_precision]\navg_bits = 3.0\n'
                                      'candidates = ["int2", "int4"]\nsamples = 2\n'
                                      'max_iters = 5\n')
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((3, 4, 64)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 10, (3, 4)))
    art = tmp_path / "art"
    assert main(["build", "qcompile.zoo:mlp", "-o", str(art), "--config", str(tmp_path / "q.toml"),
                 "--calibration", str(tmp_path / "cal.npz"), "--labels",
                 str(tmp_path / "y.npy")]) == 0
    out = capsys.readouterr().out
    assert "mixed precision (hawq-v3; avg_bits ≤ 3)" in out
    formats = [ly["format"].split()[0] for ly in qcompile.load(art).summary()["layers"]]
    assert set(formats) <= {"int2", "int4"} and len(formats) == 3
    (tmp_path / "bad.toml").write_text('group_size = 32\n[mixed_precision]\navg_bits = 1.0\n')
    assert main(["build", "qcompile.zoo:mlp", "-o", str(tmp_path / "b"), "--config",
                 str(tmp_path / "bad.toml"), "--calibration", str(tmp_path / "cal.npz")]) == 2
    assert "least achievable is avg_bits=2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["build", "qcompile.zoo:mlp", "--target", "tpu", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'tpu'" in err and "reference" in err
    assert not (tmp_path / "a").exists()
    assert main(["run", str(tmp_path)]) == 2
    assert "ArtifactError" in capsys.readouterr().err


def test_tune_trials_are_checked_before_any_work(tmp_path, capsys):
    """``--tune-trials`` reaches compile(); tuning itself is tested in the TVM backend's tests."""
    assert main(["build", "qcompile.zoo:mlp", "-o", str(tmp_path / "a"),
                 "--tune-trials", "-1"]) == 2
    assert "tune_trials must be a non-negative integer" in capsys.readouterr().err
    assert main(["build", "qcompile.zoo:mlp", "-o", str(tmp_path / "a"),
                 "--tune-trials", "8"]) == 2  # the default target, reference, has no tuning
    assert "target 'reference' cannot be tuned" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "qcompile", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("inspect", "build", "run", "bench", "info"):
        assert cmd in out


@pytest.mark.parametrize("what", ["file", "directory"])
def test_build_refuses_to_replace_what_is_not_an_artifact(tmp_path, capsys, monkeypatch, what):
    """Checked before the compile: nothing is built, nothing is touched; --force replaces it."""
    out = tmp_path / "out"
    if what == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    compiles = []
    real = qcompile.compile
    monkeypatch.setattr(qcompile, "compile", lambda *a, **k: compiles.append(a) or real(*a, **k))
    assert main(["build", "qcompile.zoo:mlp", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ArtifactError" in err and f"{out} exists and is a" in err and "--force" in err
    assert compiles == []
    assert (out if what == "file" else out / "keep.txt").read_text() == "keep me"
    assert main(["build", "qcompile.zoo:mlp", "-o", str(out), "--force"]) == 0
    assert len(compiles) == 1 and qcompile.load(out).target == "reference"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main(["build", "qcompile.zoo:mlp", "-o", str(out)]) == 0  # an artifact: replaced


def _info(capsys, *args) -> str:
    assert main(["info", *args]) == 0
    return capsys.readouterr().out


def test_info_prints_cpu_isa_targets_and_versions(capsys, monkeypatch):
    from qcompile import isa
    monkeypatch.delenv(isa.ENV, raising=False)
    out = _info(capsys)
    assert f"isa level    {isa.level()} (host {isa.host_level()}, QCOMPILE_ISA unset)" in out
    for f in isa.describe()["features"]:
        assert f in out
    for word in ("avx-512", "VNNI", "amx", "granted by the OS", "cache", "reference",
                 "runs here", "torch", "lut"):
        assert word in out, word
    info = json.loads(_info(capsys, "--json"))
    assert info["isa"] == isa.describe()
    assert info["cpu"]["avx2"] == ("avx2" in isa.host_features())
    assert set(info["cpu"]["avx512"]) == {"F", "BW", "DQ", "VL", "VNNI", "BF16", "VBMI",
                                          "VBMI2", "VPOPCNTDQ", "FP16"}
    assert info["targets"]["reference"].startswith("runs here")
    assert info["versions"]["torch"] == torch.__version__
    assert info["cpu"]["cores"] >= 1


def test_info_follows_the_isa_cap(capsys, monkeypatch):
    from qcompile import isa
    if "avx2" not in isa.supported_levels():
        pytest.skip("the host has no AVX2")
    monkeypatch.setenv(isa.ENV, "avx2")
    info = json.loads(_info(capsys, "--json"))
    assert info["isa"]["level"] == "avx2" and info["isa"]["cap"] == "avx2"
    assert not [f for f in info["isa"]["features"] if f.startswith("avx512")]
    if info["versions"]["tvm"] is not None:
        assert info["kernels"]["tvm_mcpu"] == "x86-64-v3"
    assert "isa level    avx2 (host" in _info(capsys)


def test_info_with_an_invalid_isa_cap_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setenv("QCOMPILE_ISA", "avx9000")
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "QCOMPILE_ISA='avx9000'" in err and "Traceback" not in err


def test_build_across_devices_prints_the_plan_and_takes_pins_back(tmp_path, capsys):
    """`--target cpu,reference` places the model, prints the plan and writes plan.json; the
    plan with a pin edited goes back in with --plan; a bad plan fails before any build."""
    pytest.importorskip("tvm")
    art = tmp_path / "art"
    assert main(["build", "qcompile.zoo:mlp", "--target", "cpu,reference", "-o", str(art)]) == 0
    out = capsys.readouterr().out
    assert "placement:" in out and "lower bound" in out and "baselines:" in out
    plan = json.loads((art / "plan.json").read_text())
    assert {d["name"] for d in plan["devices"]} == {"cpu", "reference"}
    plan["pins"] = {"*": "reference"}
    (tmp_path / "pinned.json").write_text(json.dumps(plan))
    art2 = tmp_path / "art2"
    assert main(["build", "qcompile.zoo:mlp", "--target", "cpu,reference", "-o", str(art2),
                 "--plan", str(tmp_path / "pinned.json")]) == 0
    loaded = qcompile.load(art2)
    assert set(loaded.plan_assignment().values()) == {"reference"}
    model, (x,), _ = mlp()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    (tmp_path / "bad.json").write_text(json.dumps({"pins": {"*": "gpu"}, "oops": 1}))
    capsys.readouterr()
    assert main(["build", "qcompile.zoo:mlp", "--target", "cpu,reference", "-o", str(tmp_path / "c"),
                 "--plan", str(tmp_path / "bad.json")]) != 0
    captured = capsys.readouterr()
    assert "unknown plan keys" in captured.err and "placement costs" not in captured.err
    assert not (tmp_path / "c").exists()


def _llm_dir(tmp_path):
    """A random-weight Llama directory with a real tokenizer (MiniLM's WordPiece: offline)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompile.zoo import _minilm_path
    src = _minilm_path()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=30522)
    torch.manual_seed(0)
    d = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{src}/{f}", d / f)
    return d


def test_build_an_llm_directory_and_generate(tmp_path, capsys):
    d = _llm_dir(tmp_path)
    out = tmp_path / "llm"
    assert main(["build", str(d), "--target", "reference", "-o", str(out), "--max-seq-len", "32"]) == 0
    assert "llama, 1 layers" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("hello world") and "6 tokens in" in text and "tokens/s" in text
    # the tokens printed are the model's greedy tokens
    llm = qcompile.load(out)
    tok = llm.tokenizer()
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    want = tok.decode(llm.generate(ids, 6)[0], skip_special_tokens=True)
    assert want in text
    # a model artifact is not an LLM
    cm = qcompile.compile(mlp()[0], "reference", example_inputs=mlp()[1])
    cm.save(tmp_path / "mlp")
    assert main(["generate", str(tmp_path / "mlp"), "--prompt", "x"]) == 2
    assert "not a compiled LLM" in capsys.readouterr().err
