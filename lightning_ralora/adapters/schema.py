"""Typed config schemas and the one set of field checks the whole package shares.

Every check returns a list of problems (empty when fine), each naming the field as the user writes it
(``adapter.r``, ``trainer.devices``, ...), so the layers (ValueError), the callbacks and the CLI (ConfigError) report
the same sentence. Also the serialised form of one adapter layer (`LayerSpec`), which configs build and layers read.
Pure Python: no torch, Lightning, Hydra or transformers imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

# --------------------------------------------------------------------------------------------------------------
# predicates
# --------------------------------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_pos_int(value: Any) -> bool:
    """An int (not a bool) > 0."""
    return is_int(value) and value > 0


def is_nonneg_int(value: Any) -> bool:
    """An int (not a bool) >= 0."""
    return is_int(value) and value >= 0


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_power_of_two(value: Any) -> bool:
    """A positive int power of two (1, 2, 4, ...)."""
    return is_pos_int(value) and (value & (value - 1)) == 0


# --------------------------------------------------------------------------------------------------------------
# checks: [] when fine, else one sentence naming the field
# --------------------------------------------------------------------------------------------------------------


def pos_int(value: Any, name: str) -> list[str]:
    """`name` must be a positive integer."""
    return [] if is_pos_int(value) else [f"{name} must be a positive integer, got {value!r}"]


def nonneg_int(value: Any, name: str) -> list[str]:
    """`name` must be an integer >= 0."""
    return [] if is_nonneg_int(value) else [f"{name} must be a non-negative integer, got {value!r}"]


def pos_number(value: Any, name: str) -> list[str]:
    """`name` must be a number > 0."""
    return [] if is_number(value) and value > 0 else [f"{name} must be a positive number, got {value!r}"]


def nonneg_number(value: Any, name: str) -> list[str]:
    """`name` must be a number >= 0."""
    return [] if is_number(value) and value >= 0 else [f"{name} must be a number >= 0, got {value!r}"]


def unit_interval(value: Any, name: str) -> list[str]:
    """`name` must be a number in [0, 1) (a dropout probability)."""
    return [] if is_number(value) and 0 <= value < 1 else [f"{name} must be in [0, 1), got {value!r}"]


def power_of_two(value: Any, name: str) -> list[str]:
    """`name` must be a power of two."""
    return [] if is_power_of_two(value) else [f"{name} must be a power of two (1, 2, 4, 8, ...), got {value!r}"]


def one_of(value: Any, name: str, allowed: Iterable[Any]) -> list[str]:
    """`name` must be one of `allowed`."""
    allowed = list(allowed)
    return [] if value in allowed else [f"{name} must be one of {allowed}, got {value!r}"]


def pos_number_or_none(value: Any, name: str, none_means: str) -> list[str]:
    """`name` must be a positive number or null (`none_means` says what null stands for)."""
    if value is None or (is_number(value) and value > 0):
        return []
    return [f"{name} must be a positive number or null ({none_means}), got {value!r}"]


def raise_problems(problems: list[str], prefix: str = "") -> None:
    """Raise one ValueError carrying every problem (nothing when the list is empty)."""
    if problems:
        raise ValueError(prefix + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# the per-layer spec
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LayerSpec:
    """Everything needed to rebuild one adapter layer deterministically (a plan entry is one of these).

    The serialised form of every variant's layer (plans in checkpoints and results.json). Only the fields a variant
    uses matter to it; the rest keep their defaults. The named fields are those of the built-in variants (kept
    first-class so old checkpoints and `LayerSpec(kind=..., r=..., n_blocks=...)` calls still work); a variant
    registered later keeps its own per-layer fields in `extra` (written only when non-empty).
    """

    kind: str
    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False  # LoRA: s = alpha/sqrt(r) instead of alpha/r
    n_blocks: int = 1  # RaLoRA: block-diagonal blocks
    k: int = 1  # GraLoRA: k x k grid
    hybrid_r: int = 0  # Hybrid GraLoRA: extra dense rank
    scale: float | None = None  # explicit scale override (RaLoRA alpha/r_ref)
    extra: dict[str, Any] = field(default_factory=dict)  # per-layer fields of variants registered later

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able); `extra` appears only when non-empty, so built-in specs serialise as before."""
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpec:
        """Inverse of `to_dict` (reads every dict written so far, with or without `extra`)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"LayerSpec: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        data = dict(data)
        data["extra"] = dict(data.get("extra") or {})
        return cls(**data)


# --------------------------------------------------------------------------------------------------------------
# config schemas
# --------------------------------------------------------------------------------------------------------------


def doc(text: str, default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a per-field doc string (`metadata["doc"]`)."""
    if default is not MISSING:
        kwargs["default"] = default
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class CallbackSpec:
    """A callback a variant needs: `target` is "module:Class" (imported lazily, so adapters/ stays Lightning-free)."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class AdapterConfig:
    """Fields every `adapter` config has; variants subclass it with their own fields and rules."""

    kind: ClassVar[str] = ""
    prefix: ClassVar[str] = "adapter"
    # True: a rank above min(in, out) cannot be built (SDS's orthonormal bases), so `shape_problems` refuses it too;
    # False: it only wastes parameters, and config validation refuses it (`rank_limits`)
    ranks_must_fit: ClassVar[bool] = False

    name: str = doc("variant name (W&B group, results.json)", "")
    target_modules: Any = doc("null: model.target_modules; or a list of module-name suffixes / a regex", None)
    dtype: str | None = doc("adapter tensor dtype; null: at least float32 whatever the base dtype", None)
    lr_ratio_B: float = doc("LoRA+: the B-side factors train at lr_ratio_B x optim.lr (1.0: plain)", 1.0)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """{field: its doc} for this schema."""
        return {f.name: f.metadata.get("doc", "") for f in fields(cls)}

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> AdapterConfig:
        """The schema filled from a plain mapping (the composed `adapter` group); `kind` and unknown keys are
        left out here and reported by `unknown_keys`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @classmethod
    def unknown_keys(cls, cfg: Mapping[str, Any]) -> list[str]:
        """One problem per key of `cfg` this schema does not declare."""
        known = {f.name for f in fields(cls)} | {"kind"}
        return [
            f"{cls.prefix}.{k} is not a field of {cls.prefix}.kind={cls.kind!r}; fields: {sorted(known - {'kind'})}"
            for k in cfg
            if k not in known
        ]

    def f(self, name: str) -> str:
        """The user-facing name of one field (`adapter.r`)."""
        return f"{self.prefix}.{name}"

    def validate(self) -> list[str]:
        """Every problem of the config's own fields, one sentence each naming the field."""
        problems = []
        if self.dtype is not None and self.dtype not in ADAPTER_DTYPES:
            allowed = "null (at least float32), " + ", ".join(ADAPTER_DTYPES)
            problems.append(f"{self.f('dtype')}={self.dtype!r} is unknown; allowed: {allowed}")
        problems += pos_number(self.lr_ratio_B, self.f("lr_ratio_B"))
        return problems

    def shape_problems(self, in_features: int, out_features: int) -> list[str]:
        """Problems fitting this config onto one target linear (in_features -> out_features); [] by default."""
        return []

    def rank_limits(self) -> dict[str, int]:
        """{field: rank} of the ranks that must not exceed min(in_features, out_features) of any target: an update
        of an m x n layer has rank at most min(m, n), so a larger rank only adds parameters. {} by default."""
        return {}

    def rank_problems(self, in_features: int, out_features: int) -> list[str]:
        """One sentence per `rank_limits` field above min(in_features, out_features) of one target linear."""
        lim = min(in_features, out_features)
        return [
            f"{self.f(k)}={v} must be <= min(in_features, out_features)={lim} of the target layer"
            for k, v in self.rank_limits().items()
            if v > lim
        ]

    def to_spec(self) -> LayerSpec:
        """The LayerSpec a uniform plan uses for every target (layer kinds only)."""
        raise TypeError(f"adapter.kind={self.kind!r} builds no adapter layers")

    def callbacks(self) -> list[CallbackSpec]:
        """Lightning callbacks the variant needs to train (import path + kwargs)."""
        return []

    @property
    def needs_plan(self) -> bool:
        """True when the per-layer plan comes from a callback (or a checkpoint), not from this config."""
        return False


@dataclass
class LowRankConfig(AdapterConfig):
    """A rank-r update with scale from alpha and input dropout (LoRA-type variants, peft)."""

    r: int = doc("rank of the update", None)
    alpha: float = doc("scale numerator (s = alpha/r unless the variant says otherwise)", 16.0)
    dropout: float = doc("dropout on the adapter input", 0.0)
    compile: bool = doc("torch.compile each layer's update (our layer kinds; equal to eager within rounding)", False)

    def validate(self) -> list[str]:
        """Base fields plus r > 0, alpha > 0, dropout in [0, 1), compile a bool."""
        problems = [
            *super().validate(),
            *pos_int(self.r, self.f("r")),
            *pos_number(self.alpha, self.f("alpha")),
            *unit_interval(self.dropout, self.f("dropout")),
        ]
        if not isinstance(self.compile, bool):
            problems.append(f"{self.f('compile')} must be true or false, got {self.compile!r}")
        return problems

    def rank_limits(self) -> dict[str, int]:
        """The rank r (for every low-rank kind: LoRA's r, GraLoRA's total r over its k x k blocks, RaLoRA's r)."""
        return {"r": self.r} if is_pos_int(self.r) else {}

    def layer_spec(self, **variant_fields: Any) -> LayerSpec:
        """The LayerSpec of this config: the shared fields plus the variant's own."""
        common = {"kind": self.kind, "r": int(self.r), "alpha": float(self.alpha), "dropout": float(self.dropout)}
        return LayerSpec(**common, **variant_fields)
