"""qcompile backends: each registers target names, says which nodes it supports, gives a
cost per node per device, and lowers a graph to an executable."""
from qcompile.backends import amx as _amx  # noqa: F401  (amx; TVM + a C++ compiler to build)
from qcompile.backends import lut as _lut  # noqa: F401  (lut; TVM + a C compiler to build)
from qcompile.backends import onnx as _onnx  # noqa: F401  (onnx, npu; ONNX Runtime to run)
from qcompile.backends import reference as _reference  # noqa: F401  (registers 'reference')
from qcompile.backends import rpc as _rpc  # noqa: F401  (rpc://host:port; TVM RPC remotes)
from qcompile.backends import tvm as _tvm  # noqa: F401  (cpu, cuda; needs apache-tvm to build)
from qcompile.backends.base import (
    Backend,
    Executable,
    all_targets,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "Executable", "register_backend", "get_backend", "all_targets"]
