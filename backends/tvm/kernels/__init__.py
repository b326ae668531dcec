"""Hand-scheduled TIR kernels for the TVM backend, one family per module.

The contract every kernel module follows:

- a builder ``name(..., info) -> tvm.tirx.PrimFunc`` returns a *scheduled* PrimFunc ready for
  ``relax.call_tir``; the leading row count ``m`` (batch × sequence) may be an ``int`` or a
  symbolic ``tvm.tirx.Var(..., "int64")``, and the kernel is correct for every value of it;
  ``info`` is a ``qcompile.backends.tvm.target.CpuInfo`` (vector width, AVX-512, VNNI, cores)
  that picks the schedule;
- weights are constants, so each module also has ``pack_*`` functions (numpy in, numpy out)
  that lay them out for the kernel at compile time;
- all index arithmetic is int64; outputs are the last PrimFunc arguments (destination
  passing, as ``call_tir`` expects);
- every kernel is checked against numpy/torch in ``tests/backends/tvm/`` and measured
  against its peers in ``benchmarks/``.
"""
