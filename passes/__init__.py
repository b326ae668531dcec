"""qcompile passes: one transform per file, registered by name, run by a ``PassManager``."""
from qcompile.passes.manager import PassManager, all_passes, get_pass, register_pass, run_passes
from qcompile.passes import canonicalize as _canonicalize  # noqa: F401  (registers passes)
from qcompile.passes import fold_constants as _fold  # noqa: F401

__all__ = ["PassManager", "register_pass", "get_pass", "all_passes", "run_passes"]
