"""qcompile passes: one transform per file, registered by name, run by a ``PassManager``."""
from qcompile.passes import calibrate as _calibrate  # noqa: F401
from qcompile.passes import canonicalize as _canonicalize  # noqa: F401  (registers passes)
from qcompile.passes import canonicalize_npu as _canonicalize_npu  # noqa: F401
from qcompile.passes import decompose_attention as _decompose_attention  # noqa: F401
from qcompile.passes import decompose_fused as _decompose_fused  # noqa: F401
from qcompile.passes import fold_constants as _fold  # noqa: F401
from qcompile.passes import fold_norms as _fold_norms  # noqa: F401
from qcompile.passes import mixed_precision as _mixed_precision  # noqa: F401
from qcompile.passes import quantize_activations as _quantize_activations  # noqa: F401
from qcompile.passes import quantize_all_activations as _quantize_all  # noqa: F401
from qcompile.passes import quantize_weights as _quantize_weights  # noqa: F401
from qcompile.passes import rotate as _rotate  # noqa: F401
from qcompile.passes import smoothquant as _smoothquant  # noqa: F401
from qcompile.passes import sparsify as _sparsify  # noqa: F401
from qcompile.passes.manager import PassManager, all_passes, get_pass, register_pass, run_passes

__all__ = ["PassManager", "register_pass", "get_pass", "all_passes", "run_passes"]
