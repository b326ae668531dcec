"""``QuantConfig``: what to quantize, to which formats, with which algorithm — a typed
dataclass, also loadable from TOML.

    cfg = QuantConfig(weights="int4", group_size=128, algorithm="gptq")
    cfg = QuantConfig.from_toml("q.toml")      # the same fields, top-level keys

``overrides`` maps glob patterns (``fnmatch``, matched against a layer's module path and its
weight's constant name) to field changes for the layers that match, or to ``"skip"`` to
leave them in float: ``{"*.attention.*": {"weights": "int8"}, "classifier": "skip"}``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from qcompile.errors import ConfigError

__all__ = ["QuantConfig", "LayerConfig", "Budget", "ALGORITHMS", "ROTATIONS", "SPARSITY_METHODS",
           "PRECISION_METHODS"]

ALGORITHMS = ("rtn", "gptq", "awq")
ROTATIONS = (None, "hadamard", "random", "pca")
ACT_GRANULARITIES = ("per_token", "per_tensor")
RESQ_DEFAULTS = {"fraction": 0.125, "weights": "int8", "activations": "int8"}
_LAYER_FIELDS = ("weights", "group_size", "weight_options", "activations",
                 "activation_granularity", "algorithm", "sparsity", "sparsity_method")
SPARSITY_METHODS = ("wanda", "magnitude", "2:4")
PRECISION_METHODS = ("hawq-v3", "clado")
SENSITIVITIES = ("trace", "eigenvalue", "measured")
LOSSES = ("auto", "task", "kl", "mse")
_BUDGET_LIMITS = ("avg_bits", "size_mb", "gbops", "latency_ms")


@dataclass(frozen=True)
class Budget:
    """A mixed-precision budget: which per-layer weight formats to choose among, under which
    limits, by which method (``qcompile.passes.mixed_precision``).

    - limits (any combination, at least one): ``avg_bits`` — the element bits of the chosen
      formats averaged over the weights mixed precision decides (HAWQ's "average bit-width";
      scales not counted); ``size_mb`` — the whole model's weight storage in MB (10⁶ bytes),
      codes, scales and padding included, other constants at their dtype; ``gbops`` — giga
      bit-operations ``Σ MACs·b_w·b_a`` of one calibration sample (HAWQ-V3 eq. 11);
      ``latency_ms`` — the compiled model's latency on one calibration sample, predicted from
      per-layer latencies measured on ``latency_target`` (default: the compile target).
    - ``candidates``: weight format names (``"int2"``, ``"int4"``, ``"mxfp4"``, ``"nvfp4"``, ...);
      group size and options come from the config (block formats carry their own).
    - ``method``: ``"hawq-v3"`` (HAWQ-V2 sensitivities, integer linear program) or
      ``"clado"`` (measured cross-layer interactions, quadratic program).
    - ``sensitivity``: ``"trace"`` (HAWQ-V2: Hutchinson's ``Tr(H)/n``), ``"eigenvalue"``
      (Q-BERT: the top Hessian eigenvalue by power iteration) or ``"measured"`` (OHQ: the
      loss increase with only that layer quantized, one forward pass per layer and format —
      where the quadratic model fails, as at 2 bits); ``loss``: ``"task"`` (cross
      entropy, or MSE for float labels; needs ``labels``), ``"kl"`` or ``"mse"`` to the float
      model's output, ``"auto"``: task with labels, else MSE; ``samples``: calibration samples
      the sensitivities and CLADO's measurements use; ``max_iters`` / ``tol``: Hutchinson's
      stopping rule (PyHessian: 100 probes, or a running-mean change below 1e-3 relative).
    - ``fixed``: pattern → format for layers kept out of the search (``"first"`` and
      ``"last"`` name the first and last of the layers mixed precision decides, after
      ``skip`` overrides: HAWQ-V3 keeps them at 8 bits);
      ``ties``: groups of patterns whose layers must share a format; ``tie_shared_inputs``:
      also tie layers that read one input (Q/K/V), so one quantized input serves them all.
    - ``time_limit``: seconds for the solver (HiGHS); ``clado_psd``: project CLADO's ``G`` on
      the PSD cone as the paper does for its convex MIQP solver. Off by default: qcompile's
      linearisation is exact for any ``G``, and the projection moves the cross terms that
      feasible assignments use, so it can miss the optimum of an exact quadratic loss that the
      raw ``G`` finds.
    """

    avg_bits: float | None = None
    size_mb: float | None = None
    gbops: float | None = None
    latency_ms: float | None = None
    candidates: tuple = ("int2", "int3", "int4", "int8")
    method: str = "hawq-v3"
    sensitivity: str = "trace"
    loss: str = "auto"
    samples: int = 8
    max_iters: int = 100
    tol: float = 1e-3
    fixed: Mapping[str, str] = field(default_factory=dict)
    ties: tuple = ()
    tie_shared_inputs: bool = True
    latency_target: str | None = None
    time_limit: float = 60.0
    clado_psd: bool = False
    seed: int = 0

    def __post_init__(self):
        from qcompile.formats import get
        if isinstance(self.candidates, str):
            object.__setattr__(self, "candidates", (self.candidates,))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        ties = self.ties
        if isinstance(ties, str) or (ties and all(isinstance(t, str) for t in ties)):
            ties = (ties,) if not isinstance(ties, str) else ((ties,),)  # one flat group
        object.__setattr__(self, "ties", tuple(tuple([t] if isinstance(t, str) else t)
                                               for t in ties))
        if not self.candidates:
            raise ConfigError("Budget.candidates is empty", hint="e.g. ('int4', 'int8')")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"Budget.candidates repeats a format: {list(self.candidates)}")
        for c in (*self.candidates, *self.fixed.values()):
            if not isinstance(c, str):
                raise ConfigError(f"a mixed-precision candidate is a format name, got {c!r}")
            get(c)
        limits = self.limits()
        if not limits:
            raise ConfigError("a mixed-precision Budget needs a limit",
                              hint=f"set one or more of {', '.join(_BUDGET_LIMITS)}")
        for k, v in limits.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"Budget.{k} must be a positive number, got {v!r}")
        if self.method not in PRECISION_METHODS:
            raise ConfigError(f"unknown mixed-precision method {self.method!r}",
                              hint=f"use one of {', '.join(PRECISION_METHODS)}")
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"unknown sensitivity {self.sensitivity!r}",
                              hint=f"use one of {', '.join(SENSITIVITIES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown sensitivity loss {self.loss!r}",
                              hint=f"use one of {', '.join(LOSSES)}")
        for k in ("samples", "max_iters"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Budget.{k} must be a positive integer, got {v!r}")
        if not self.tol >= 0 or not self.time_limit > 0:
            raise ConfigError("Budget.tol must be ≥ 0 and Budget.time_limit > 0")

    def limits(self) -> dict[str, float]:
        """The limits that are set, by name."""
        return {k: getattr(self, k) for k in _BUDGET_LIMITS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else
                         [list(t) for t in v] if f.name == "ties" else
                         list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def coerce(cls, b) -> "Budget | None":
        if b is None or isinstance(b, Budget):
            return b
        if isinstance(b, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(b) - names)
            if unknown:
                raise ConfigError(f"unknown Budget field(s) {unknown}",
                                  hint=f"fields: {', '.join(sorted(names))}")
            return cls(**b)
        raise ConfigError(f"mixed_precision must be a qcompile.Budget or a dict, got "
                          f"{type(b).__name__}")


def _check_sparsity(lc, where: str) -> None:
    at = f" (layer {where})" if where else ""
    if lc.sparsity_method not in SPARSITY_METHODS:
        raise ConfigError(f"unknown sparsity_method {lc.sparsity_method!r}{at}",
                          hint=f"use one of {', '.join(SPARSITY_METHODS)}")
    if lc.sparsity is None:
        return
    if isinstance(lc.sparsity, bool) or not isinstance(lc.sparsity, (int, float)) \
            or not 0 <= float(lc.sparsity) < 1:
        raise ConfigError(f"sparsity must be a fraction in [0, 1){at}, got {lc.sparsity!r}")
    if lc.sparsity_method == "2:4" and float(lc.sparsity) not in (0.0, 0.5):
        raise ConfigError(f"sparsity_method '2:4' prunes exactly half the weights{at}; got "
                          f"sparsity={lc.sparsity}", hint="set sparsity=0.5, or use 'wanda' / "
                          "'magnitude' for other ratios")


@dataclass(frozen=True)
class LayerConfig:
    """The resolved settings of one layer (after overrides)."""

    weights: str | None
    group_size: int | None
    weight_options: Mapping[str, Any]
    activations: str | None
    activation_granularity: str
    algorithm: str
    sparsity: float | None = None
    sparsity_method: str = "wanda"

    def weight_format(self):
        """The ``qcompile.formats`` format of this layer's weights (None: stays float)."""
        if self.weights is None:
            return None
        from qcompile.formats import get
        opts = dict(self.weight_options)
        fmt = get(self.weights, **opts)
        if fmt.granularity.value in ("none",):
            return fmt
        if self.group_size is not None and not fmt.block_only:
            return get(self.weights, **{**opts, "group_size": self.group_size})
        if self.group_size is None and not fmt.block_only and "granularity" not in opts:
            return get(self.weights, **{**opts, "granularity": "per_channel"})
        return fmt

    def with_weights(self, name: str) -> "LayerConfig":
        """This layer with weight format ``name``, keeping only the ``weight_options`` that
        format accepts (a mixed-precision candidate need not take every option of another)."""
        from qcompile.formats import get
        keep = {}
        for k, v in self.weight_options.items():
            try:
                get(name, **{k: v})
            except ConfigError:
                continue
            keep[k] = v
        return dataclasses.replace(self, weights=name, weight_options=keep)

    def activation_format(self):
        if self.activations is None:
            return None
        from qcompile.formats import get
        fmt = get(self.activations)
        if fmt.block_only or fmt.granularity.value == "none":
            return fmt
        return get(self.activations, granularity=self.activation_granularity)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    - ``weights``: a format name from ``qcompile.formats`` (``"int4"``, ``"mxfp4"``,
      ``"nf4"``, ``"bf16"``, ...) or None to keep float weights; ``group_size`` (None: per
      output channel; ignored by block formats, which carry their own); ``weight_options``:
      further format options (``{"symmetric": False, "scale_dtype": "fp16"}``).
    - ``activations``: a format for the inputs of quantized linears, or None;
      ``activation_granularity``: ``"per_token"`` (dynamic) or ``"per_tensor"`` (static,
      from calibration).
    - ``algorithm``: ``"rtn"``, ``"gptq"`` or ``"awq"``; ``rtn_clip_search`` adds an MSE
      search of the clipping ratio; ``gptq`` / ``awq``: their options.
    - ``rotation``: None, ``"hadamard"``, ``"random"`` or ``"pca"`` (ResQ); ``resq``: for
      ``"pca"``, the high-variance subspace's ``fraction`` of the width (1/8) and its
      ``weights`` and ``activations`` formats (``"int8"`` both); ``smoothquant``:
      None or α in [0, 1]; ``smoothquant_alpha_overrides``: per-layer α by pattern.
    - ``kv_cache``: a format for attention's K and V, or None.
    - ``sparsity``: None, or the fraction of each linear's weights to prune (0 ≤ s < 1)
      before quantization; ``sparsity_method``: ``"wanda"`` (|W|·‖X‖ per output row, from
      calibration), ``"magnitude"`` (|W| over the layer) or ``"2:4"`` (two of every four
      consecutive weights, Wanda's score where calibration data is given; sparsity 0.5).
    - ``mixed_precision``: a :class:`Budget` (or its dict): each layer's weight format is
      chosen among the budget's candidates by HAWQ-V3 or CLADO; overrides that set a layer's
      ``weights`` pin it.
    - ``calibration_size``: how many calibration samples are used at most.
    """

    weights: str | None = "int4"
    group_size: int | None = 128
    weight_options: Mapping[str, Any] = field(default_factory=dict)
    activations: str | None = None
    activation_granularity: str = "per_token"
    algorithm: str = "rtn"
    rtn_clip_search: bool = False
    gptq: Mapping[str, Any] = field(default_factory=dict)
    awq: Mapping[str, Any] = field(default_factory=dict)
    rotation: str | None = None
    resq: Mapping[str, Any] = field(default_factory=dict)
    smoothquant: float | None = None
    smoothquant_alpha_overrides: Mapping[str, float] = field(default_factory=dict)
    kv_cache: str | None = None
    sparsity: float | None = None
    sparsity_method: str = "wanda"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    mixed_precision: Budget | None = None
    calibration_size: int = 128
    seed: int = 0

    def __post_init__(self):
        from qcompile.formats import get
        object.__setattr__(self, "mixed_precision", Budget.coerce(self.mixed_precision))
        for name in ("weights", "activations", "kv_cache"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"QuantConfig.{name} must be a format name or None, got {v!r}")
            if v is not None:
                get(v)  # raises ConfigError naming the format and the known ones
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown quantization algorithm {self.algorithm!r}",
                              hint=f"use one of {', '.join(ALGORITHMS)}")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"unknown rotation {self.rotation!r}",
                              hint="use None, 'hadamard', 'random' or 'pca'")
        bad = sorted(set(self.resq) - set(RESQ_DEFAULTS))
        if bad:
            raise ConfigError(f"unknown resq option(s) {bad}", hint=f"options: {', '.join(RESQ_DEFAULTS)}")
        if not 0 < float(self.resq_options()["fraction"]) < 1:
            raise ConfigError(f"resq fraction must be in (0, 1), got {self.resq['fraction']}")
        for k in ("weights", "activations"):
            get(self.resq_options()[k])
        if self.activation_granularity not in ACT_GRANULARITIES:
            raise ConfigError(f"activation_granularity must be one of {ACT_GRANULARITIES}, got "
                              f"{self.activation_granularity!r}")
        if self.smoothquant is not None and not 0 <= float(self.smoothquant) <= 1:
            raise ConfigError(f"smoothquant α must be in [0, 1], got {self.smoothquant}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer or None, got "
                              f"{self.group_size!r}")
        if not isinstance(self.calibration_size, int) or self.calibration_size < 1:
            raise ConfigError(f"calibration_size must be a positive integer, got "
                              f"{self.calibration_size!r}")
        for pat, ov in self.overrides.items():
            if ov == "skip" or ov is None:
                continue
            if not isinstance(ov, Mapping):
                raise ConfigError(f"override {pat!r} must be a dict of fields or 'skip', got {ov!r}")
            bad = sorted(set(ov) - set(_LAYER_FIELDS))
            if bad:
                raise ConfigError(f"override {pat!r} sets {bad}, which cannot vary per layer",
                                  hint=f"per-layer fields: {', '.join(_LAYER_FIELDS)}")
        self.layer("")  # the defaults resolve (formats and group sizes fit together)

    def resq_options(self) -> dict:
        return {**RESQ_DEFAULTS, **self.resq}

    # -- per layer --------------------------------------------------------------------
    def layer(self, *names: str) -> LayerConfig | None:
        """Settings for the layer known by ``names`` (module path, weight name); None when an
        override says ``"skip"``. Later matching patterns win."""
        d = {k: getattr(self, k) for k in _LAYER_FIELDS}
        for pat, ov in self.overrides.items():
            if any(n and fnmatch.fnmatchcase(n, pat) for n in names):
                if ov == "skip" or ov is None:
                    return None
                d.update(ov)
        lc = LayerConfig(**d)
        _check_sparsity(lc, names[0] if names else "")
        lc.weight_format()
        lc.activation_format()
        if lc.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown quantization algorithm {lc.algorithm!r} for layer "
                              f"{names[0] if names else ''}")
        return lc

    # -- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else
                         v.to_dict() if isinstance(v, Budget) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s) {unknown}",
                              hint=f"fields: {', '.join(sorted(names))}")
        d = {k: (None if v == "none" and k in ("weights", "activations", "rotation",
                                               "kv_cache", "smoothquant", "group_size") else v)
             for k, v in d.items()}
        return cls(**d)

    @classmethod
    def from_toml(cls, source: str | Path) -> "QuantConfig":
        """Read a TOML file (or TOML text): top-level keys are the fields; ``"none"`` means
        None, and tables give ``overrides``, ``gptq``, ``awq``, ``weight_options``,
        ``mixed_precision``."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        p = Path(source) if not isinstance(source, Path) else source
        try:
            text = p.read_text() if p.suffix == ".toml" or p.exists() else str(source)
        except OSError as e:
            raise ConfigError(f"cannot read config {source}: {e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {source} is not valid TOML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, config) -> "QuantConfig":
        if config is None or isinstance(config, QuantConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, (str, Path)):
            return cls.from_toml(config)
        raise ConfigError(f"config must be a QuantConfig, a dict or a TOML path, got "
                          f"{type(config).__name__}")
