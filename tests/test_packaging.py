"""The wheel holds exactly one top-level package, qcompile, with passes and backends inside."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_only_qcompile(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("qcompile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"qcompile"}
    for mod in ("qcompile/passes/manager.py", "qcompile/backends/reference/__init__.py",
                "qcompile/ir/ops/nn.py", "qcompile/frontends/pytorch.py"):
        assert mod in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert "qcompile = qcompile.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_import_paths():
    import qcompile.backends
    import qcompile.passes
    assert Path(qcompile.passes.__file__).parent.name == "passes"
    assert Path(qcompile.backends.__file__).parent.name == "backends"
