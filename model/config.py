"""Typed, frozen run configs read from ``configs/*.yaml`` (groups nnet, optimizer, train, sample).

Every value is checked when the file is read: a malformed file, an unknown key or a value of
the wrong type (``depth: four``) raises a ValueError naming the file and the key."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(str(resources.files("configs")))  # configs/*.yaml, shipped as package data

# The keys of the ``nnet`` group and their types: the arguments of model.uvit.MultiModalUViT
# (kept here so that reading a config needs no torch; a test keeps the two in step).
# img_size / in_chans / patch_size: one value for all modalities, or a mapping with one per
# modality (the native family); a size is a side or an [H, W] pair (scalars: [1, N]).
NNET_FIELDS = {"modalities": "list[str]", "img_size": "size or map", "in_chans": "int or map",
               "patch_size": "int or map",
               "embed_dim": "int", "depth": "int", "num_heads": "int", "mlp_ratio": "float", "qkv_bias": "bool",
               "mlp_time_embed": "bool", "prediction": "str", "zero_terminal_snr": "bool"}


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.99, 0.99)
    warmup_steps: int = 5000
    schedule: str = "constant_with_warmup"  # or cosine / linear: decay to 0 at the run's last step (after warmup)

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optimizer.schedule: unknown {self.schedule!r}; valid: {', '.join(LR_SCHEDULES)}")


LR_SCHEDULES = ("constant_with_warmup", "cosine", "linear")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256
    max_steps: int = 500_000
    p_clean: float = 0.1  # share of per-modality draws fed clean (timestep 0), as conditions at sampling
    p_drop: float = 0.1  # share trained as pure noise at the final timestep (marginals)
    loss_weighting: str = "eps"  # eps (the paper) | min_snr | x0: see model.diffusion.loss_weights
    loss_gamma: float = 5.0  # the cap of min_snr / x0 weighting
    ema_decay: float = 0.9999
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3  # the newest checkpoints kept (older ones deleted); the final model is kept besides
    log_every: int = 100
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    hflip: bool = True  # mirror each tuple left-right with probability 1/2 (all modalities together), as the paper
    seed: int = 0


    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.loss_weighting not in ("eps", "min_snr", "x0"):
            raise ValueError(f"train.loss_weighting: unknown {self.loss_weighting!r}; valid: eps, min_snr, x0")
        if not (0 <= self.p_clean and 0 <= self.p_drop and self.p_clean + self.p_drop <= 1):
            raise ValueError(f"train.p_clean + train.p_drop must be a share in [0, 1], got {self.p_clean} + {self.p_drop}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"train.mixed_precision: unknown {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISIONS)}")


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50


@dataclass(frozen=True)
class RunConfig:
    nnet: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_train(self, **changes: Any) -> "RunConfig":
        return replace(self, train=replace(self.train, **changes))


_KINDS = {"int or map": "an integer, or a mapping of modality names to integers",
          "size or map": "a side, an [H, W] pair, or a mapping of modality names to either",
          "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "tuple[float, float]": "a pair of numbers", "list[str]": "a list of names"}


def _fits(value: Any, kind: str) -> bool:
    """Whether a YAML value has the type ``kind`` (a field's annotation, as text)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "size":
        return _fits(value, "int") or (isinstance(value, (list, tuple)) and len(value) == 2
                                       and all(_fits(v, "int") for v in value))
    if kind.endswith(" or map"):
        one = kind.removesuffix(" or map")
        if isinstance(value, dict):
            return bool(value) and all(isinstance(k, str) and _fits(v, one) for k, v in value.items())
        return _fits(value, one)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "tuple[float, float]":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_fits(v, "float") for v in value)
    if kind == "list[str]":
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)
    raise TypeError(f"no check for the type {kind}")


def _checked(values: Any, kinds: dict[str, str], group: str, path: Path) -> dict[str, Any]:
    """The group's values (a mapping), each checked against its type in ``kinds``; a
    ValueError names the file and the key of an unknown key or a value of the wrong type."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {group} must be a mapping of keys to values, got {values!r}")
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} in {group}; valid keys: {sorted(kinds)}")
    out = {}
    for key, value in values.items():
        kind = kinds[key]
        if not _fits(value, kind):
            hint = ""
            if kind == "float" and isinstance(value, str) and _is_number(value):
                hint = " (YAML reads a number such as 1e-3 as text: write 1.0e-3)"
            raise ValueError(f"{path}: {group}.{key} must be {_KINDS[kind]}, got {value!r}{hint}")
        out[key] = value
    return out


def _as_declared(value: Any, kind: str) -> Any:
    """A checked value as its dataclass field declares it: numbers as floats, pairs as tuples."""
    if kind == "float":
        return float(value)
    if kind == "tuple[float, float]":
        return tuple(float(v) for v in value)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _typed(cls, values: Any, group: str, path: Path):
    """``cls`` (a config dataclass) from the YAML group ``group`` of ``path``."""
    kinds = {f.name: str(f.type) for f in fields(cls)}
    checked = _checked(values, kinds, group, path)
    try:
        return cls(**{key: _as_declared(value, kinds[key]) for key, value in checked.items()})
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(f"{path}:") else f"{path}: {message}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's groups; a ValueError names the file (and the line of a syntax error)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of groups (nnet, optimizer, train, sample), "
                         f"got a {type(raw).__name__}")
    return raw


def load_config(name_or_path: str | os.PathLike) -> RunConfig:
    """A config by name (``tiny``, ``paper``, ``release``) or path to a YAML file."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no config {str(name_or_path)!r}; give a YAML path or one of {names}")
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - {"nnet", "optimizer", "train", "sample"})
    if unknown:
        raise ValueError(f"{path}: unknown groups {unknown}; valid groups: nnet, optimizer, train, sample")
    group = {name: {} if raw.get(name) is None else raw[name] for name in ("nnet", "optimizer", "train", "sample")}
    return RunConfig(
        nnet=_checked(group["nnet"], NNET_FIELDS, "nnet", path),
        optimizer=_typed(OptimizerConfig, group["optimizer"], "optimizer", path),
        train=_typed(TrainConfig, group["train"], "train", path),
        sample=_typed(SampleConfig, group["sample"], "sample", path),
    )
