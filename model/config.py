"""Typed, frozen run configs read from ``configs/*.yaml`` (groups nnet, optimizer, train, sample)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.99, 0.99)
    warmup_steps: int = 5000


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
    log_every: int = 100
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    hflip: bool = True  # mirror each tuple left-right with probability 1/2 (all modalities together), as the paper
    seed: int = 0


    def __post_init__(self) -> None:
        if self.loss_weighting not in ("eps", "min_snr", "x0"):
            raise ValueError(f"train.loss_weighting: unknown {self.loss_weighting!r}; valid: eps, min_snr, x0")
        if not (0 <= self.p_clean and 0 <= self.p_drop and self.p_clean + self.p_drop <= 1):
            raise ValueError(f"train.p_clean + train.p_drop must be a share in [0, 1], got {self.p_clean} + {self.p_drop}")


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


def _typed(cls, values: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(known)}")
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return cls(**values)


def load_config(name_or_path: str | os.PathLike) -> RunConfig:
    """A config by name (``tiny``, ``paper``, ``release``) or path to a YAML file."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no config {str(name_or_path)!r}; give a YAML path or one of {names}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"nnet", "optimizer", "train", "sample"})
    if unknown:
        raise ValueError(f"{path}: unknown groups {unknown}; valid groups: nnet, optimizer, train, sample")
    return RunConfig(
        nnet=dict(raw.get("nnet", {})),
        optimizer=_typed(OptimizerConfig, raw.get("optimizer", {}), f"{path} optimizer"),
        train=_typed(TrainConfig, raw.get("train", {}), f"{path} train"),
        sample=_typed(SampleConfig, raw.get("sample", {}), f"{path} sample"),
    )
