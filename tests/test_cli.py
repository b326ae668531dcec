"""The qcompile command: inspect, build, run and bench (targets reference, cpu and lut)."""
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
    for cmd in ("inspect", "build", "run", "bench"):
        assert cmd in out
