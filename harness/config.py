"""Typed run configuration: pydantic models with defaults, loaded from YAML plus
`section.key=value` overrides. Every problem surfaces as a one-line ConfigError."""
from __future__ import annotations

import copy
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .errors import BAD_INPUT, HarnessError
from .methods import METHOD_BY_MODE

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
PosInt = Annotated[int, Field(ge=1)]

DEFAULT_LR = {"cifar100": 0.05}
FALLBACK_LR = 0.1
# dataset / architecture dependent defaults (Config.resolved)
AUTO_KEYS = ("data.augment.crop_pad", "data.augment.flip", "data.augment.autoaugment",
             "data.augment.cutout", "model.lam_init", "train.lr")
NATURAL_IMAGES = ("cifar10", "cifar100", "imagefolder")
SMALL_MODELS = ("cnn_small",)
QCFS_LAM_INIT, SMALL_LAM_INIT = 8.0, 2.0

# Custom pydantic error type: ctx["expected"] says what is accepted; an optional
# ctx["field"] (+ ctx["value"]) names a key below the error's location.
EXPECTED_ERROR = "harness_expected"


class ConfigError(HarnessError):
    """A configuration problem: one line per problem, each starting with 'config error: '
    (a config with several bad keys reports all of them at once)."""

    kind = "config error"
    exit_code = BAD_INPUT

    def __init__(self, message: str | Sequence[str]):
        problems = [message] if isinstance(message, str) else list(message)
        super().__init__(problems[0])
        self.problems = [" ".join(str(p).split()) for p in problems]

    def __str__(self) -> str:
        return "\n".join(f"{self.kind}: {p}" for p in self.problems)


def expected_error(expected: str, field: str | None = None, value: Any = None) -> PydanticCustomError:
    """Error to raise from validators; formatted as `<key> = <value!r> (expected ...)`."""
    ctx: dict[str, Any] = {"expected": expected}
    if field is not None:
        ctx.update(field=field, value=value)
    return PydanticCustomError(EXPECTED_ERROR, "expected {expected}", ctx)


class Section(BaseModel):
    """Base of every config section (also the search space's): unknown keys are errors,
    inf / nan are never a valid number here."""

    # strict: `epochs: true` or `epochs: "3"` is an error, not 1 or 3 (a float field still
    # takes an integer)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# ---------------------------------------------------------------- schema

class AugmentCfg(Section):
    """Training augmentation. null (the default) = the dataset's own default, resolved
    once the image size is known (see `Config.resolved`)."""
    crop_pad: int | None = Field(None, ge=0)
    flip: bool | None = None
    cutout: int | None = Field(None, ge=0)
    autoaugment: bool | None = None


class SyntheticCfg(Section):
    num_train: PosInt = 2000
    num_test: PosInt = 500
    channels: PosInt = 3
    size: PosInt = 32
    num_classes: int = Field(10, ge=2)


class DataCfg(Section):
    name: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.1, gt=0, le=0.5)
    batch_size: PosInt = 128
    eval_batch_size: PosInt = 512
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    synthetic: SyntheticCfg = Field(default_factory=SyntheticCfg)

    @model_validator(mode="after")
    def _root_required(self) -> DataCfg:
        if self.name == "imagefolder" and not self.root:
            raise expected_error("a folder or .tar.gz path when data.name is imagefolder", "root", self.root)
        return self


GradFormulation = Literal["nq", "qcfs_iclr"]


class ModelCfg(Section):
    arch: str = Field("cnn_small", min_length=1)
    L: PosInt = 4
    lam_init: float | None = Field(None, gt=0)  # null: the architecture's default (Config.resolved)
    # gradient of the quantiser: "nq" clips z/lambda to [0, 1] before the floor (the NQ
    # authors' MPLayer, putshua/ANN_SNN_QCFS); "qcfs_iclr" clips after it
    # (putshua/SNN_conversion_QCFS). Forward values are identical.
    grad: GradFormulation = "nq"
    # timm/<name> models: adapt the stem (and VGG's head) to 32x32 input (harness.models.from_timm)
    cifar_stem: bool = False

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from harness.models import TIMM_PREFIX, list_models

        if arch.startswith(TIMM_PREFIX):
            import timm
            if not timm.is_model(arch[len(TIMM_PREFIX):]):
                raise expected_error(f"{TIMM_PREFIX}<name> with a name from timm.list_models()")
            return arch
        if arch not in list_models():
            raise expected_error("one of: " + ", ".join(list_models()))
        return arch


class NoiseCfg(Section):
    mode: Literal["qcfs", "fixed", "layerwise"] = "layerwise"
    delta: float = Field(0.0, ge=0)
    tau: PosInt = 4
    residual: Literal["end_to_end", "layer_local"] = "end_to_end"
    calib_samples: PosInt | None = None  # a class-stratified random subset of the validation split
    calib_augment: bool = False  # calibrate on training-augmented images (the official NQ code does)
    scale: float = Field(1.0, ge=0)


class TrainCfg(Section):
    epochs: PosInt = 3
    lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5.0e-4, ge=0)
    lam_weight_decay: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    threads: PosInt | None = None
    amp: bool = False
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def resolved_lr(self, dataset_name: str) -> float:
        """The configured lr, or the dataset default (0.05 for cifar100, 0.1 otherwise)."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(dataset_name, FALLBACK_LR)


class EvalCfg(Section):
    T: list[PosInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], min_length=1)
    select_T: PosInt = 4
    select_on: Literal["val", "test"] = "val"
    every: PosInt = 1

    @field_validator("T")
    @classmethod
    def _sorted_unique(cls, T: list[int]) -> list[int]:
        return sorted(set(T))

    @model_validator(mode="after")
    def _select_T_evaluated(self) -> EvalCfg:
        if self.select_T not in self.T:
            raise expected_error(f"one of eval.T: {', '.join(map(str, self.T))}", "select_T", self.select_T)
        return self


class Config(Section):
    data: DataCfg = Field(default_factory=DataCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    noise: NoiseCfg = Field(default_factory=NoiseCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `noise:` with every key commented out parses as None: treat it as empty.
        if isinstance(data, Mapping):
            return {k: ({} if v is None and k in cls.model_fields else v) for k, v in data.items()}
        return data

    @property
    def lr(self) -> float:
        return self.train.resolved_lr(self.data.name)

    @property
    def method(self) -> str:
        return METHOD_BY_MODE[self.noise.mode]

    def auto_keys(self) -> list[str]:
        """Dotted keys left null (= resolved from the dataset and architecture)."""
        return [k for k in AUTO_KEYS if _get_dotted(self.to_dict(), k) is None]

    def resolved(self, image_size: int) -> Config:
        """A copy with every null default filled in for this dataset and architecture:

        - natural images (cifar10/100, imagefolder): random crop padded by size/8 and
          horizontal flips; at 32x32 also the QCFS recipe's AutoAugment (CIFAR-10
          policy) and one 16-px Cutout hole (size/2).
        - digits and synthetic images: crop padded by size/8 (1 px on 8x8 digits), no
          flips (a mirrored digit is another glyph), no AutoAugment, no Cutout.
        - model.lam_init: 8.0 (the QCFS initial threshold) for the CIFAR networks; 2.0 for
          cnn_small, whose activations rarely exceed 2 (from 8.0 a short run never
          brings lambda into range, and low-T accuracy measures the initialisation).
        - train.lr: 0.05 for CIFAR-100, 0.1 otherwise (the paper's settings).
        Explicit values are kept. The resolved config is what result.json and MLflow record.
        """
        natural = self.data.name in NATURAL_IMAGES
        cifar_like = natural and image_size == 32
        auto = {
            "data.augment.crop_pad": max(1, round(image_size / 8)),
            "data.augment.flip": natural,
            "data.augment.autoaugment": cifar_like,
            "data.augment.cutout": image_size // 2 if cifar_like else 0,
            "model.lam_init": SMALL_LAM_INIT if self.model.arch in SMALL_MODELS else QCFS_LAM_INIT,
            "train.lr": self.train.resolved_lr(self.data.name),
        }
        d = self.to_dict()
        for key in self.auto_keys():
            set_dotted(d, key, auto[key])
        return Config.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            raise ConfigError(format_validation_errors(exc, model=cls)) from None

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalars (lists joined with commas), e.g. for MLflow params."""
        return _flatten(self.to_dict())


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(e) for e in v)
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> Config:
    """YAML file (None: defaults) over `base`, then `section.key=value` overrides, validated."""
    raw = read_yaml(Path(path)) if path is not None else {}
    merged = deep_merge(base or {}, raw)
    check_unique_overrides(overrides)
    for override in overrides:
        apply_override(merged, override)
    return Config.from_dict(merged)


def read_yaml(path: Path, what: str = "file") -> dict[str, Any]:
    """A YAML mapping from `path`; every problem is a one-line ConfigError naming `what`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {str(path)!r} is a folder (expected a YAML file)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (expected a YAML file)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r} ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{where} ({problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `top` over `base`, merging nested mappings key by key."""
    out = copy.deepcopy(dict(base))
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(d: dict[str, Any], override: str, model: type[BaseModel] = Config) -> None:
    """Set `a.b.c=value` (value parsed as YAML) in `d`, checking the path against `model`."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r} (expected section.key=value)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r} (value is not valid YAML)") from None
    check_dotted_key(".".join(parts), override=override, model=model)
    set_dotted(d, ".".join(parts), value)


def check_unique_overrides(overrides: Sequence[str]) -> None:
    """The same key twice with --set is refused (the last one would win silently)."""
    keys = [o.partition("=")[0].strip() for o in overrides]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"--set {dup[0]} is given {keys.count(dup[0])} times (expected each key once)")


def check_dotted_key(key: str, where: str = "", override: str | None = None,
                     model: type[BaseModel] = Config) -> None:
    """`key` (section.key[.sub]) must name a setting of `model`, or raise a one-line
    ConfigError. `where` prefixes the key in messages (e.g. "grid"); `override` is the
    whole `--set` text, quoted when a prefix of the key is not a section."""
    parts = key.split(".")
    shown = [where, *parts] if where else parts
    current: Any = model
    for i, part in enumerate(parts):
        if not _is_model(current):
            head = ".".join(shown[: i + (1 if where else 0)])
            raise ConfigError(f"override {override!r} ({head} is not a section)" if override
                              else f"unknown key {'.'.join(shown)} ({head} is not a section)")
        if part not in current.model_fields:
            raise ConfigError(_unknown_key(shown[: i + 1 + (1 if where else 0)], current))
        current = _strip(current.model_fields[part].annotation)[0]
    if len(parts) < 2:
        raise ConfigError(f"{'.'.join(shown)} names a whole section (expected section.key)")


def _get_dotted(d: Mapping[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d['a']['b']['c'] = value for key 'a.b.c', creating sections as needed."""
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ---------------------------------------------------------------- error messages

def format_validation_error(exc: ValidationError, prefix_loc: Sequence[str | int] = (),
                            model: type[BaseModel] | None = None) -> str:
    """One line for the first error: `<dotted key> = <value!r> (expected ...)`.

    `prefix_loc` is prepended to the reported key (for a schema nested in a larger
    file); `model`, the validated class, gives precise wording (accepted keys, ranges).
    Wrap the result in ConfigError (or your own error) to add the 'config error:' prefix.
    """
    return format_validation_errors(exc, prefix_loc, model)[0]


def format_validation_errors(exc: ValidationError, prefix_loc: Sequence[str | int] = (),
                             model: type[BaseModel] | None = None) -> list[str]:
    """One line per error (see `format_validation_error`), in the order pydantic found them."""
    return [_format_one(err, prefix_loc, model) for err in exc.errors(include_url=False)]


def _format_one(err: Mapping[str, Any], prefix_loc: Sequence[str | int], model: type[BaseModel] | None) -> str:
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    shown = tuple(prefix_loc) + loc
    if kind == "extra_forbidden":
        owner = _resolve(model, loc[:-1]) if model else (None, [])
        return _unknown_key(shown, owner[0] if _is_model(owner[0]) else None)
    if kind == "missing":
        return f"missing key {_dotted(shown)}"
    value = err.get("input")
    if kind == EXPECTED_ERROR:
        if "field" in ctx:
            shown, value = shown + (ctx["field"],), ctx.get("value")
        expected = ctx["expected"]
    else:
        described = _describe(*_resolve(model, loc)) if model else None
        expected = described or _fallback_expected(kind, err["msg"], ctx)
    return f"{_dotted(shown)} = {value!r} (expected {expected})"


def _unknown_key(loc: Sequence[str | int], owner: type[BaseModel] | None) -> str:
    accepted = f" (accepted: {', '.join(owner.model_fields)})" if owner else ""
    return f"unknown key {_dotted(loc)}{accepted}"


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _fallback_expected(kind: str, msg: str, ctx: Mapping[str, Any]) -> str:
    if kind == "literal_error":
        return "one of: " + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
    msg = re.sub(r"^(Input should be|Value error,)\s*", "", msg)
    return msg[:1].lower() + msg[1:]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any) -> tuple[Any, list[Any], bool]:
    """Unwrap Annotated / Optional: (core type, constraints, nullable)."""
    constraints: list[Any] = []
    nullable = False
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp, *meta = get_args(tp)
            for m in meta:
                constraints.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        elif origin in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            nullable = True
            if len(rest) != 1:
                return Union[tuple(rest)], constraints, nullable
            tp = rest[0]
        else:
            return tp, constraints, nullable


def _resolve(model: type[BaseModel] | None, loc: Sequence[str | int]) -> tuple[Any, list[Any]]:
    """The type and constraints found at `loc` inside `model` ((None, []) if unknown)."""
    tp: Any = model
    constraints: list[Any] = []
    nullable = False
    for part in loc:
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            info = tp.model_fields[part]
            tp, constraints, nullable = _strip(info.annotation)
            constraints = list(info.metadata) + constraints
        elif get_origin(tp) is list and isinstance(part, int):
            tp, constraints, nullable = _strip(get_args(tp)[0])
        else:
            return None, []
    if nullable:
        tp = Union[tp, None]
    return tp, constraints


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}


def _describe(tp: Any, constraints: Sequence[Any] = (), plural: bool = False) -> str | None:
    """Plain-words description of what a field accepts, e.g. 'an integer >= 1 or null'."""
    core, extra, nullable = _strip(tp)
    constraints = list(constraints) + extra
    if nullable:
        inner = _describe(core, constraints, plural)
        if not inner:
            return None
        return f"{inner}, or null" if " or " in inner else f"{inner} or null"
    if get_origin(core) is Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(core))
    if get_origin(core) is list:
        item = _describe(get_args(core)[0], (), plural=True)
        nonempty = any(getattr(c, "min_length", 0) for c in constraints)
        return f"a {'non-empty ' if nonempty else ''}list of {item}" if item else None
    if _is_model(core):
        return "a mapping with keys: " + ", ".join(core.model_fields)
    if core not in _NOUNS:
        return None
    words = [_NOUNS[core][plural]]
    ops = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"),
           annotated_types.Le: ("<=", "le"), annotated_types.Lt: ("<", "lt")}
    bounds = [f"{sym} {getattr(c, attr):g}" for c in constraints
              for kind, (sym, attr) in ops.items() if isinstance(c, kind)]
    if bounds:
        words.append(" and ".join(bounds))
    if core is str and any(getattr(c, "min_length", 0) for c in constraints):
        words = ["a non-empty string"]
    return " ".join(words)
