"""Method configs: one frozen dataclass per quantization method, and the one registry of method names.

    quantkern.quantize(model, SNRQ(bits=4, group_size=64, alpha=0.25), calib="shakespeare", tokenizer=tok)
    quantkern.solve(W, H, SNRQ(bits=2), D=D)                   # one layer (or method="snrq" with a QuantSpec)

A config is its grid (QuantSpec's fields: bits, group_size, sym, act_order, static_groups, damp; a config IS
a QuantSpec, so `config.spec` is the plain grid) plus the method's own options. Each option is declared
once, with its default, the values it allows and a help line (`option(...)`): the constructor checks them
(ValueError naming the field and what it allows), the CLI derives its flags and --help from them, and a
checkpoint records `to_dict()` (with CONFIG_VERSION) for `config_from_dict` to rebuild.

Registration is by config class, so this module imports nothing above the grid: `@register("name")` adds a
config to METHODS (the one list of method names); the solver module binds `quantkern.solve`'s function
with `@solvers.registry.register_solver(Config)`, the driver binds its plug-in with
`models.driver.register_plugin(Config, PluginClass)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

from .calibration.fisher import FISHER_KINDS
from .grid import GRID_KINDS
from .spec import QuantSpec

CONFIG_VERSION = 1  # bump when a field changes meaning; config_from_dict refuses newer versions
SNRQ_GRIDS = GRID_KINDS + ("dynamic", "union", "select", "guard")  # group params of SNRQ's decode (solvers/snrq.py)
GRID_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))

METHODS: dict[str, type["MethodConfig"]] = {}  # name -> config class; every method name lives here


class MethodOptionError(ValueError):
    """A keyword the method does not take (raised before any work; the CLI prints it as one line)."""


# ----------------------------------------------------------------------------------- option rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """What values an option allows: `ok(value)` and the words for the error message."""
    allowed: str
    ok: Callable[[object], bool]


def one_of(*values) -> Rule:
    return Rule(f"one of {values}", lambda v: isinstance(v, (str, bool, type(None))) and v in values)


def number(lo=None, hi=None, *, integer=False, hi_open=False, lo_open=False, also=()) -> Rule:
    """A (finite) number in [lo, hi] (open ends as asked), an int with `integer`, or one of `also`."""
    def ok(v):
        if v in also and isinstance(v, (str, type(None))):
            return True
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
            return False
        return ((lo is None or (v > lo if lo_open else v >= lo)) and
                (hi is None or (v < hi if hi_open else v <= hi)))

    kind = "an integer" if integer else "a number"
    rng = ("" if lo is None else f" {'>' if lo_open else '>='} {lo}") + (
        "" if hi is None else f"{' and' if lo is not None else ''} {'<' if hi_open else '<='} {hi}")
    extra = "" if not also else " or " + " or ".join(repr(a) for a in also)
    return Rule(f"{kind}{rng}{extra}", ok)


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
PATH = Rule("a file path or None", lambda v: v is None or isinstance(v, str))


def option(default, help: str, rule: Rule):
    """A method option: its default, a one-line help (the CLI shows it) and the values it allows."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule})


# ----------------------------------------------------------------------------------- the base class

@dataclasses.dataclass(frozen=True)
class MethodConfig(QuantSpec):
    """A method's grid and options. Subclass with `@register("name")` and frozen, kw_only option fields."""

    name: ClassVar[str] = ""
    solver: ClassVar[Callable | None] = None  # bound by solvers.registry.register_solver
    plugin: ClassVar[type | None] = None  # bound by models.driver.register_plugin
    on_command_line: ClassVar[bool] = True  # False: reached another way (gguf_grid: `quantize --gguf-type`)

    def __post_init__(self):
        super().__post_init__()  # the grid: bits, group_size, damp
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            value = getattr(self, f.name)
            if rule is not None and not rule.ok(value):
                raise ValueError(f"{type(self).__name__}: {f.name} must be {rule.allowed}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between options (each field's own values are checked from its `option(...)` rule)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in GRID_FIELDS)

    @property
    def spec(self) -> QuantSpec:
        """The plain grid (what the solvers, kernels and checkpoint read)."""
        return QuantSpec(**{k: getattr(self, k) for k in GRID_FIELDS})

    def options(self) -> dict:
        return {k: getattr(self, k) for k in self.option_names()}

    def solver_options(self) -> dict:
        """The keywords quantkern.solve gets (default: every option; methods whose solver takes fewer say so)."""
        return self.options()

    def to_dict(self) -> dict:
        """JSON-able, versioned: what a checkpoint records (config_from_dict rebuilds it)."""
        return {"version": CONFIG_VERSION, "method": self.name, **{k: getattr(self, k) for k in GRID_FIELDS},
                "options": self.options()}


def register(name: str):
    """Class decorator: add a config class to METHODS under `name`."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise TypeError(f"register({name!r}) needs a MethodConfig subclass, got {cls!r}")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def config_class(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def make_config(name: str, spec: QuantSpec | None = None, **options) -> MethodConfig:
    """The config of method `name` on `spec`'s grid with `options` (the keyword form of quantize_model, the CLI
    and recipes). Also takes two older spellings: alpha_mode= (SNRQ) and h_in= (OAC / YAQA)."""
    cls = config_class(name)
    options = _legacy_spellings(name, dict(options))
    known = cls.option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        elsewhere = {k: [m for m, c in METHODS.items() if k in c.option_names()] for k in unknown}
        hint = "; ".join(f"{k} is an option of {', '.join(ms)}" for k, ms in elsewhere.items() if ms)
        raise MethodOptionError(f"method {name!r} has no option(s) {unknown}; its options: {list(known)}"
                                + (f" ({hint})" if hint else ""))
    spec = QuantSpec() if spec is None else spec
    grid = spec.spec if isinstance(spec, MethodConfig) else spec  # a config's grid, not its options
    return cls(**grid.to_dict(), **options)


def _legacy_spellings(name: str, kw: dict) -> dict:
    cls = config_class(name)
    if "alpha_mode" in kw and "alpha_mode" not in cls.option_names():
        mode = kw.pop("alpha_mode")
        if mode not in ("fixed", "sample", "optimize"):
            raise ValueError(f"alpha_mode must be 'fixed', 'sample' or 'optimize', got {mode!r}")
        if mode != "fixed":
            kw["alpha"] = mode
    if "h_in" in kw and issubclass(cls, _Gradient):
        h_in = kw.pop("h_in")
        if h_in not in (None, "fisher", "act"):
            raise ValueError(f"h_in must be 'fisher' or 'act', got {h_in!r}")
        if issubclass(cls, OAC) and h_in == "act":
            raise ValueError("oac uses the output-adaptive Hessian; h_in='act' would be plain GPTQ (use h_mix)")
        if h_in is not None:
            if "h_mix" in kw:
                raise ValueError("pass h_mix or h_in, not both")
            kw["h_mix"] = 0.0 if h_in == "act" else 1.0
    return kw


def with_grid(config: MethodConfig, spec: QuantSpec) -> MethodConfig:
    """`config`'s method and options on `spec`'s grid (a recipe applied to the grid the user asked for)."""
    return dataclasses.replace(config, **{k: getattr(spec, k) for k in GRID_FIELDS})


def config_from_dict(d: dict | None) -> MethodConfig | None:
    """Rebuild a config from `MethodConfig.to_dict()` (a checkpoint's meta.config). None for None (a checkpoint
    written before configs were recorded); ValueError for a newer version or an unknown method."""
    if d is None:
        return None
    version = d.get("version")
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(f"method config version {version!r} is not one this quantkern reads (<= {CONFIG_VERSION}); "
                         "upgrade quantkern")
    return config_class(d["method"])(**{k: d[k] for k in GRID_FIELDS if k in d}, **d.get("options", {}))


# ----------------------------------------------------------------------------------- the methods
# kw_only: options after the grid's defaults, always by name (SNRQ(bits=4, alpha=0.5)).
_frozen = dataclasses.dataclass(frozen=True, kw_only=True)
_ALPHA = "weight of the full-precision stream in the target, X_q + alpha (X_f - X_q)"
_UNIT = number(0, 1)
_LABELS = "gradient targets: 'data' (next tokens) or 'sample' (drawn from the model)"
_GRAD_KIND = "statistics collected: this method's, or 'both' (a cache file OAC and YAQA share)"
_BEAM = "beam width of the K-best decode (1 = greedy)"


@register("rtn")
@_frozen
class RTN(MethodConfig):
    """Round to nearest on the min/max grid: no calibration data."""


@register("gptq")
@_frozen
class GPTQ(MethodConfig):
    """GPTQ (Frantar et al. 2022): error feedback through the inverse-Hessian Cholesky factor."""


@register("ldlq")
@_frozen
class LDLQ(MethodConfig):
    """LDLQ (QuIP): GPTQ's decode with static group params from W (groups contiguous in processing order)."""


@register("gptaq")
@_frozen
class GPTAQ(MethodConfig):
    """GPTAQ / GPTQv2 (Li et al. 2025): GPTQ plus the full-precision stream's asymmetric term."""
    alpha: float = option(0.25, _ALPHA, _UNIT)


@register("snrq")
@_frozen
class SNRQ(MethodConfig):
    """SNRQ: greedy successive rounding towards the shifted target (solvers/snrq.py); K > 1 is K-SNRQ."""
    alpha: float | str = option(0.25, _ALPHA + "; 'sample' (SNRQ-S) or 'optimize' (closed form, one-layer lag)",
                                number(0, 1, also=("sample", "optimize")))
    mixup: float = option(5.0, "alpha='sample': alpha ~ Beta(mixup, mixup) per sequence", number(0, lo_open=True))
    K: int = option(1, _BEAM, number(1, integer=True))
    cd_passes: int = option(0, "coordinate-descent passes after the decode", number(0, integer=True))
    alpha_init: float = option(0.25, "alpha='optimize': the first layer's alpha", _UNIT)
    grid: str = option("minmax", "group params: minmax, mse, dynamic, union, or select/guard among them",
                       one_of(*SNRQ_GRIDS))

    def solver_options(self) -> dict:
        return {k: v for k, v in self.options().items() if k != "mixup"}  # mixup shapes the statistics only


@register("ksnrq")
@_frozen
class KSNRQ(SNRQ):
    """K-SNRQ: SNRQ with a bounded K-best search per row (K defaults to 4)."""
    K: int = option(4, _BEAM, number(1, integer=True))


@register("adaround")
@_frozen
class AdaRound(MethodConfig):
    """AdaRound (Nagel et al. 2020): learned rounding on the grid of `base`, layer-wise on H."""
    base: str = option("rtn", "whose grid the rounding is learned on", one_of("rtn", "gptq", "ldlq"))
    iters: int = option(500, "optimisation steps per layer", number(1, integer=True))
    lr: float | None = option(None, "Adam learning rate (None: the solver's default)",
                              number(0, lo_open=True, also=(None,)))
    lam: float = option(1.0, "weight of the rounding regulariser", number(0))
    b_start: float = option(20.0, "annealed regulariser exponent at the start", number(0, lo_open=True))
    b_end: float = option(2.0, "... and at the end", number(0, lo_open=True))
    warmup: float = option(0.2, "fraction of steps without the regulariser", number(0, 1, hi_open=True))


@_frozen
class _Gradient(MethodConfig):
    """Options shared by the methods on model-loss gradients (models/grad_methods.py)."""
    labels: str = option("data", _LABELS, one_of("data", "sample"))
    grad_nsamples: int | None = option(None, "calibration sequences used for gradients (None: all)",
                                       number(1, integer=True, also=(None,)))
    grad_batch: int = option(1, "sequences per gradient forward/backward", number(1, integer=True))
    grad_stats_path: str | None = option(None, "gradient statistics cache file (loaded if it matches, else written)",
                                         PATH)
    fisher: str = option("sequence", "Fisher statistics per sequence (the papers) or per token",
                         one_of(*FISHER_KINDS))
    h_mix: float = option(1.0, "input-side Hessian (1 - h_mix) H_act + h_mix F (1: the Fisher alone)", _UNIT)
    alpha: float = option(0.25, _ALPHA + " (with the SNRQ core / grid)", _UNIT)
    grid: str = option("minmax", "SNRQ grid (with the SNRQ core / grid)", one_of(*SNRQ_GRIDS))

    def uses_snrq(self) -> bool:
        raise NotImplementedError


@register("oac")
@_frozen
class OAC(_Gradient):
    """OAC (Edalati et al.): the output-adaptive Hessian E_s[G_s^T G_s] in a GPTQ or SNRQ core."""
    grad_kind: str = option("oac", _GRAD_KIND, one_of("oac", "both"))
    core: str = option("gptq", "the rounding core", one_of("gptq", "snrq"))
    row_groups: int = option(1, "one Fisher per block of output rows (needs fisher='token')", number(1, integer=True))
    K: int = option(1, "SNRQ core: " + _BEAM, number(1, integer=True))
    cd_passes: int = option(0, "SNRQ core: coordinate-descent passes", number(0, integer=True))

    def uses_snrq(self) -> bool:
        return self.core == "snrq"

    def check(self):
        if self.row_groups > 1 and self.fisher != "token":
            raise ValueError("OAC: row_groups > 1 needs fisher='token'")
        if self.core == "gptq" and (self.alpha != 0.25 or self.grid != "minmax" or self.K != 1 or self.cd_passes):
            raise ValueError("OAC: alpha / grid / K / cd_passes belong to core='snrq'")

    def solver_options(self) -> dict:
        kw = {"core": self.core, "alpha": self.alpha}
        if self.core == "snrq":
            kw.update(K=self.K, cd_passes=self.cd_passes, grid=self.grid)
        return kw


@register("yaqa")
@_frozen
class YAQA(_Gradient):
    """YAQA (Tseng et al.): two-sided Kronecker rounding with the output-side Fisher factor."""
    labels: str = option("sample", _LABELS, one_of("data", "sample"))
    grad_kind: str = option("yaqa", _GRAD_KIND, one_of("yaqa", "both"))
    grid_from: str = option("gptq", "whose grid and target: gptq, rtn, or snrq (shifted target, SNRQ grid)",
                            one_of("gptq", "rtn", "snrq"))
    tile: int = option(32, "Kronecker LDLQ tile size", number(1, integer=True))
    out_damp: float | None = option(None, "relative damping of the output factor (None: the grid's damp)",
                                    number(0, also=(None,)))
    out_order: bool = option(False, "decide rows with the most output curvature first", BOOL)

    def uses_snrq(self) -> bool:
        return self.grid_from == "snrq"

    def check(self):
        if self.grid_from != "snrq" and (self.alpha != 0.25 or self.grid != "minmax"):
            raise ValueError("YAQA: alpha / grid belong to grid_from='snrq'")

    def solver_options(self) -> dict:
        return {k: getattr(self, k) for k in ("grid_from", "tile", "alpha", "out_damp", "grid", "out_order")}
