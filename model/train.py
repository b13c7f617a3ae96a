"""Training the multimodal U-ViT on latent tuples, with accelerate.

Data: a mapping {modality: moments array (N, 8, H, W)} (aligned rows; see
``majortom_gen.store.load_aligned``); latents are sampled from the moments at every step
and brought to the network's space by each modality's :class:`model.codecs.LatentNorm`
(zero mean, unit variance). With ``hflip`` every tuple is mirrored left-right with
probability 1/2, all its modalities together (the paper's augmentation). Every random choice of step s (batch order, latent
samples, timesteps, noise) derives from (seed, s), so a resumed run continues exactly as
an uninterrupted one: a checkpoint holds the model, EMA, optimizer, LR scheduler and step.

Layout of ``out``::

    checkpoints/step-000100/  model (save_pretrained), ema.pt, optimizer.pt, scheduler.pt, state.json;
                              the newest ``train.keep_checkpoints`` are kept, older ones deleted
                              once a newer one is complete
    log.jsonl                 one line per logged step: step, loss, loss per modality, lr
    model/                    the EMA weights at the end (save_pretrained) and run_config.json, what
                              sampling loads

``state.json`` records the step, the config, ``data`` (what the caller says about the training
data, e.g. the codec of the latents: :func:`checkpoint_state` reads it back so that a resume
can refuse other data) and ``config_changes`` (each resume's changed config values, by step).

Folders are written under a temporary sibling name and swapped in, so that a checkpoint or
the final model is complete or absent and a new ``model/`` replaces the old one whole. A
resume takes the newest checkpoint that reads completely: a damaged one (a truncated file) is
named in a :class:`TrainingWarning` and the one before it is used.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from model.codecs import LatentNorm, sample_latents
from model.config import RunConfig
from model.diffusion import diffusion_loss, draw_timesteps, zero_snr
from model.uvit import MultiModalUViT


# The demo model shipped in the package: made by `majortom-gen train --config small` on the
# synthetic world (the command, cells, steps and hardware are in its training_data.json).
SHIPPED_DEMO_MODEL = Path(__file__).resolve().parent / "weights" / "demo-model"


# Config values that change how long a run goes and what it writes, not what a step
# computes: a resume with other values is not reported as a config change.
BOOKKEEPING = frozenset({"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                         "sample.steps"})


class TrainingWarning(UserWarning):
    """Training goes on, but the user should know: a damaged checkpoint skipped, a config
    changed on resume."""


class _Unreadable(Exception):
    """A checkpoint file that cannot be read (missing, truncated, not what it should be)."""

    def __init__(self, path: Path, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0]  # the first sentence says it
        reason = first if len(first) <= 160 else first[:157] + "..."
        super().__init__(f"{path} is unreadable ({type(error).__name__}: {reason})")


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    losses: list[float]
    model_dir: Path
    resumed_from: int | None = None  # the step of the checkpoint the run resumed from
    config_changes: list[dict] = field(default_factory=list)  # [{"step": s, "changes": {key: [old, new]}}]


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of step ``step``: epochs are seeded permutations; the last partial batch is dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:
        return np.resize(perm, batch_size)
    return perm[offset * batch_size:(offset + 1) * batch_size]


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 7]).integers(0, 2**62)))


def check_max_steps(max_steps: int) -> None:
    """Refuse a step count that trains nothing (it would leave an untrained model)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")


def check_device(device: str | None) -> None:
    """Refuse a device training cannot use: ``cuda`` without a CUDA device, or a name other
    than cpu / cuda (accelerate places the network on the GPU itself)."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r} (to choose a GPU, set CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
        raise ValueError(f"device 'cuda': no CUDA device is available ({why}; torch {torch.__version__}); "
                         "use --device cpu, or leave --device out")


def _step_of(folder: Path) -> int | None:
    try:
        return int(folder.name.removeprefix("step-"))
    except ValueError:
        return None


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoint folders under ``out``, oldest step first."""
    found = [(_step_of(p), p) for p in (Path(out) / "checkpoints").glob("step-*") if p.is_dir()]
    return [p for _, p in sorted(item for item in found if item[0] is not None)]


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = checkpoints(out)
    return ckpts[-1] if ckpts else None


def checkpoint_state(out: str | os.PathLike) -> dict | None:
    """``state.json`` of the newest checkpoint under ``out`` that has a readable one (step,
    config, ``data``, ``config_changes``), or None when there is none."""
    for ckpt in reversed(checkpoints(out)):
        try:
            return json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def _accelerator(mixed_precision: str, cpu: bool) -> Accelerator:
    """An ``Accelerator`` in ``mixed_precision``. accelerate keeps one state per process and
    refuses a second precision in it; training owns that state here, so a run in another
    precision than an earlier run of the same process (a notebook, the tests) starts it afresh."""
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def train(
    config: RunConfig,
    moments: Mapping[str, np.ndarray],
    out: str | os.PathLike,
    *,
    norms: Mapping[str, LatentNorm],
    max_steps: int | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    on_checkpoint: Callable[[int, MultiModalUViT], None] | None = None,
    device: str | None = None,
    init_from: str | os.PathLike | None = None,
    data: Mapping[str, Any] | None = None,
    finish_model: Callable[[Path, TrainResult], None] | None = None,
) -> TrainResult:
    """Train (or resume) and write checkpoints, a log and the final EMA model under ``out``.

    ``moments``: {modality: (N, 8, H, W) moments}, aligned rows; ``norms``: each modality's
    :class:`LatentNorm`. ``max_steps`` (default: the config's) must be at least 1.
    ``progress(step, total, loss)`` runs after each step, ``on_checkpoint(step, ema_network)``
    after each checkpoint (e.g. to draw a sample grid). ``device='cpu'`` forces the CPU,
    ``'cuda'`` asks for the GPU (an error without one); by default accelerate picks the GPU(s)
    when present. ``init_from``: a model folder (same network config) whose weights start a new
    run (fine-tuning); ignored when resuming from a checkpoint. ``data``: JSON facts about the
    training data (e.g. the latents' codec), kept in every checkpoint. ``finish_model(folder,
    result)`` may add files to the final model folder before it replaces ``out/model``.

    A resume refuses a changed network and warns (:class:`TrainingWarning`) about any other
    changed config value (outside :data:`BOOKKEEPING`); the changes are kept in the
    checkpoints and returned in ``TrainResult.config_changes``."""
    out = Path(out)
    total = max_steps if max_steps is not None else config.train.max_steps
    check_max_steps(total)
    check_device(device)
    names, n = _training_data(config, moments, norms)
    resumed = _start_point(out, resume)
    history = _config_history(*resumed, config) if resumed is not None else []
    accelerator = _accelerator(config.train.mixed_precision, cpu=device == "cpu" or not torch.cuda.is_available())
    run = _setup(config, accelerator, resumed[1] if resumed is not None else None, init_from, total)
    out.mkdir(parents=True, exist_ok=True)
    _truncate_log(out / "log.jsonl", run.step)
    losses = _run_steps(run, out, {m: moments[m] for m in names}, norms, n, total, data=data, history=history,
                        progress=progress, on_checkpoint=on_checkpoint)
    result = TrainResult(run.step, losses[-1] if losses else float("nan"), losses, out / "model", run.resumed_from,
                         history)
    record = {**config.as_dict(), "latent_norm": {m: norms[m].as_dict() for m in names},
              "init_from": str(init_from) if init_from is not None else None}
    _write_folder(out / "model", lambda folder: _write_model(folder, run, record, result, finish_model))
    return result


@dataclass
class _Run:
    """One training run's moving parts (network, optimizer, LR scheduler and EMA, prepared by
    accelerate) and its step count."""

    config: RunConfig
    accelerator: Accelerator
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    lr_sched: Any
    ema: EMAModel
    step: int = 0
    resumed_from: int | None = None  # the step of the checkpoint the run resumed from


def _training_data(config: RunConfig, moments: Mapping[str, np.ndarray],
                   norms: Mapping[str, LatentNorm]) -> tuple[list[str], int]:
    """The network's modalities and the number of training tuples; refuses data lacking a
    modality, a modality without a normalisation, or no tuples."""
    names = list(config.nnet.get("modalities", list(moments)))
    missing = [m for m in names if m not in moments]
    if missing:
        raise ValueError(f"the data lack modalities {missing} that the network models ({names})")
    if any(m not in norms for m in names):
        raise ValueError(f"no latent normalisation for {[m for m in names if m not in norms]}")
    n = len(next(iter(moments.values())))
    if n == 0:
        raise ValueError("no training tuples: the store has no fragment with all the network's modalities")
    return names, n


def _start_point(out: Path, resume: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents (see :func:`_resume_point`), or None for
    a new run; refuses a new run over an earlier one's checkpoints, and a resume without any."""
    earlier_run = (out / "checkpoints").exists()
    if earlier_run and not resume:
        raise ValueError(f"{out}: holds checkpoints of an earlier run; pass --resume or use another --out")
    resumed = _resume_point(out) if resume else None
    if resume and resumed is None and earlier_run:
        raise ValueError(f"{out}: --resume but no checkpoint to resume from")
    return resumed


def _setup(config: RunConfig, accelerator: Accelerator, parts: Mapping[str, Any] | None,
           init_from: str | os.PathLike | None, total_steps: int) -> _Run:
    """The network (seeded; from ``init_from``'s weights for a new run that names one),
    optimizer, LR scheduler (a decaying schedule reaches 0 at ``total_steps``) and EMA, loaded
    from a checkpoint's ``parts`` when resuming."""
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    net = MultiModalUViT(**config.nnet)
    if init_from is not None and parts is None:
        _load_init(net, init_from)
    if tcfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(net.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay,
                            betas=config.optimizer.betas)
    lr_sched = get_scheduler(config.optimizer.schedule, opt, num_warmup_steps=config.optimizer.warmup_steps,
                             num_training_steps=total_steps)
    ema = EMAModel(net.parameters(), decay=tcfg.ema_decay, model_cls=MultiModalUViT, model_config=net.config)
    resumed_from = None
    if parts is not None:
        net.load_state_dict(parts["model"])
        ema.load_state_dict(parts["ema.pt"])
        opt.load_state_dict(parts["optimizer.pt"])
        lr_sched.load_state_dict(parts["scheduler.pt"])
        resumed_from = parts["state.json"]["step"]
    net, opt, lr_sched = accelerator.prepare(net, opt, lr_sched)
    ema.to(accelerator.device)
    return _Run(config, accelerator, net, opt, lr_sched, ema, resumed_from or 0, resumed_from)


def _load_init(net: MultiModalUViT, init_from: str | os.PathLike) -> None:
    """Load the weights of the model folder ``init_from`` into ``net``; refuses another network."""
    start = MultiModalUViT.from_pretrained(init_from)
    differ = {k: (v, net.config.get(k)) for k, v in start.config.items()  # the schedule may change: same layers
              if not k.startswith("_") and k != "zero_terminal_snr" and json.dumps(net.config.get(k)) != json.dumps(v)}
    if differ:
        raise ValueError(f"{init_from}: its network differs from the config's ({differ}); fine-tune with its own config")
    if zero_snr(start) != zero_snr(net):
        warnings.warn(f"{init_from} was trained on the {_schedule_name(zero_snr(start))} noise schedule; this run "
                      f"moves it to the {_schedule_name(zero_snr(net))} one (nnet.zero_terminal_snr)", stacklevel=2)
    net.load_state_dict(start.state_dict())


def _schedule_name(zero_terminal_snr: bool) -> str:
    return "zero-terminal-SNR" if zero_terminal_snr else "released"


def _run_steps(run: _Run, out: Path, arrays: Mapping[str, np.ndarray], norms: Mapping[str, LatentNorm], n: int,
               total: int, *, data: Mapping[str, Any] | None, history: list[dict],
               progress: Callable[[int, int, float], None] | None,
               on_checkpoint: Callable[[int, MultiModalUViT], None] | None) -> list[float]:
    """Train from ``run.step`` to ``total`` on the ``n`` aligned rows of ``arrays`` (in the
    network's modality order), logging and checkpointing as the config says; returns each
    step's loss."""
    tcfg = run.config.train
    losses: list[float] = []
    with open(out / "log.jsonl", "a") as log:
        while run.step < total:
            gen = _step_generator(tcfg.seed, run.step)
            idx = np.sort(batch_indices(run.step, n, tcfg.batch_size, tcfg.seed))
            x0 = _batch(arrays, norms, idx, tcfg.hflip, gen, run.accelerator.device)
            loss, terms = _optimise(run, x0, gen)
            losses.append(loss)
            if run.step % tcfg.log_every == 0 or run.step == total:
                log.write(json.dumps({"step": run.step, "loss": loss, **{f"loss_{m}": v for m, v in terms.items()},
                                      "lr": run.lr_sched.get_last_lr()[0]}) + "\n")
                log.flush()
            if run.step % tcfg.checkpoint_every == 0 or run.step == total:
                _checkpoint(run, out, data, history, on_checkpoint)
            if progress:
                progress(run.step, total, loss)
    return losses


def _batch(arrays: Mapping[str, np.ndarray], norms: Mapping[str, LatentNorm], idx: np.ndarray, hflip: bool,
           gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """The clean latents of rows ``idx``: {modality: (B, C, H, W)} drawn from the moments and
    normalised, each tuple mirrored left-right with probability 1/2 (``hflip``), on ``device``."""
    x0 = {m: norms[m].to_network(sample_latents(torch.from_numpy(np.asarray(a[idx], dtype=np.float32)), 1.0, gen))
          for m, a in arrays.items()}
    if hflip:  # scalar tokens ((C, 1, N) latents: a location, a date) are values, not images: never mirrored
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x0 = {m: torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) if x.shape[-2] > 1 else x for m, x in x0.items()}
    return {m: x.to(device) for m, x in x0.items()}


def _optimise(run: _Run, x0: Mapping[str, torch.Tensor], gen: torch.Generator) -> tuple[float, dict[str, float]]:
    """One optimisation step on the clean latents ``x0`` (timesteps and noise from ``gen``):
    the loss and each modality's term; advances ``run.step``."""
    tcfg = run.config.train
    steps = draw_timesteps(len(next(iter(x0.values()))), list(x0), p_clean=tcfg.p_clean, p_drop=tcfg.p_drop,
                           generator=gen)
    run.net.train()
    with run.accelerator.autocast():
        loss, terms = diffusion_loss(run.net, x0, steps, generator=gen, weighting=tcfg.loss_weighting,
                                     gamma=tcfg.loss_gamma)
    run.accelerator.backward(loss)
    run.opt.step()
    run.lr_sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.ema.step(run.accelerator.unwrap_model(run.net).parameters())
    run.step += 1
    return float(loss.detach()), terms


def _checkpoint(run: _Run, out: Path, data: Mapping[str, Any] | None, history: list[dict],
                on_checkpoint: Callable[[int, MultiModalUViT], None] | None) -> None:
    """Write the checkpoint of ``run.step``, prune older ones, then call ``on_checkpoint``."""
    net = run.accelerator.unwrap_model(run.net)
    _save_checkpoint(out, run.step, net, run.ema, run.opt, run.lr_sched, run.config, data, history)
    _prune_checkpoints(out, run.config.train.keep_checkpoints, run.step)
    if on_checkpoint is not None:
        on_checkpoint(run.step, _ema_network(run.ema, run.config.nnet, run.accelerator.device))


def _write_model(folder: Path, run: _Run, record: dict, result: TrainResult,
                 finish_model: Callable[[Path, TrainResult], None] | None) -> None:
    """Fill the final model folder: the EMA network (save_pretrained), ``run_config.json``
    (``record``), then whatever ``finish_model`` adds."""
    _ema_network(run.ema, run.config.nnet, "cpu").save_pretrained(folder)
    (folder / "run_config.json").write_text(json.dumps(record, indent=1))
    if finish_model is not None:
        finish_model(folder, result)


def _read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Everything a checkpoint holds, read into memory (nothing is applied before all of it
    reads); raises _Unreadable naming the first file that does not read."""
    def network(path: Path):
        if not (path / "config.json").is_file():
            raise FileNotFoundError("no config.json")
        return MultiModalUViT.from_pretrained(path).state_dict()

    def tensors(path: Path):
        return torch.load(path, weights_only=False, map_location="cpu")

    readers = {"state.json": lambda path: json.loads(path.read_text()), "model": network, "ema.pt": tensors,
               "optimizer.pt": tensors, "scheduler.pt": tensors}
    parts = {}
    for name, read in readers.items():
        try:
            parts[name] = read(ckpt / name)
        except Exception as exc:  # any failure to read means the file is damaged or missing
            raise _Unreadable(ckpt / name, exc) from exc
    return parts


def _resume_point(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads completely, with its contents (None when there is no
    checkpoint). A damaged one is named in a warning and the one before it is tried; when none
    reads, a ValueError lists them."""
    found = checkpoints(out)
    problems = []
    for ckpt in reversed(found):
        try:
            return ckpt, _read_checkpoint(ckpt)
        except _Unreadable as exc:
            problems.append(str(exc))
            warnings.warn(f"{exc}: skipping checkpoint {ckpt.name}, trying the one before it", TrainingWarning,
                          stacklevel=3)
    if found:
        raise ValueError(f"{out}: no complete checkpoint to resume from ({'; '.join(problems)}); "
                         "start a new run (another --out)")
    return None


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"group.key": value}`` of a config dict, tuples as lists (as JSON keeps them)."""
    return {f"{group}.{key}": value for group, values in json.loads(json.dumps(config)).items()
            for key, value in values.items()}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """``{"group.key": [old, new]}`` for each config value that differs (None: not set),
    bookkeeping values aside."""
    before, after = _flat_config(old), _flat_config(new)
    return {key: [before.get(key), after.get(key)] for key in sorted(set(before) | set(after))
            if key not in BOOKKEEPING and before.get(key) != after.get(key)}


def _full_network(nnet: Mapping[str, Any]) -> dict[str, Any]:
    """The network's arguments, defaults filled in (a value written out equals it left out)."""
    params = inspect.signature(MultiModalUViT.__init__).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **nnet}


def _describe(changes: Mapping[str, list]) -> str:
    return ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())


def _config_history(ckpt: Path, parts: Mapping[str, Any], config: RunConfig) -> list[dict]:
    """The run's config changes up to this resume: the checkpoint's record plus this resume's
    changes (warned about). A changed network is refused: the weights would not fit it."""
    state = parts["state.json"]
    old, new = dict(state.get("config", {})), config.as_dict()
    old["nnet"], new["nnet"] = _full_network(old.get("nnet", {})), _full_network(new["nnet"])
    changes = config_changes(old, new)
    network = {key: change for key, change in changes.items() if key.startswith("nnet.")}
    if network:
        raise ValueError(f"{ckpt}: the network config changed since this checkpoint ({_describe(network)}); resume "
                         "with the run's config, or start a new run (another --out)")
    history = list(state.get("config_changes") or [])
    if changes:
        warnings.warn(f"{ckpt.parent.parent}: resuming from {ckpt.name} with a changed config: {_describe(changes)}; "
                      "the run goes on with the new values (recorded in its checkpoints and model)", TrainingWarning,
                      stacklevel=3)
        history.append({"step": state["step"], "changes": changes})
    return history


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from), so that
    a resumed run's log equals an uninterrupted one's."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _ema_network(ema: EMAModel, nnet: dict, device) -> MultiModalUViT:
    """A fresh network holding the EMA weights (the training network is left untouched)."""
    net = MultiModalUViT(**nnet).to(device)
    ema.copy_to(net.parameters())
    return net.eval()


def _write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary sibling of ``target``, then swap it in: at every instant
    the old folder or the new one is complete; a failure leaves the old one and no leftovers."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``; an existing ``target`` is moved aside
    first (put back if the move fails) and deleted only once the new one is in place. (The
    model package stays free of the geography package, so it keeps this small twin of
    ``majortom_gen.staging.swap_in``.)"""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(out: Path, step: int, net, ema: EMAModel, opt, lr_sched, config: RunConfig,
                     data: Mapping[str, Any] | None = None, history: list[dict] | None = None) -> None:
    """Write the checkpoint of ``step`` (complete or absent; see :func:`_write_folder`)."""
    state = {"step": step, "config": config.as_dict(), "data": dict(data) if data is not None else None,
             "config_changes": list(history or [])}

    def write(folder: Path) -> None:
        net.save_pretrained(folder / "model")
        torch.save(ema.state_dict(), folder / "ema.pt")
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save(lr_sched.state_dict(), folder / "scheduler.pt")
        (folder / "state.json").write_text(json.dumps(state))

    _write_folder(out / "checkpoints" / f"step-{step:06d}", write)


def _prune_checkpoints(out: Path, keep: int, newest: int) -> None:
    """Delete all but the ``keep`` newest checkpoints up to step ``newest`` (the one just
    written, complete). Later ones, left when a resume fell back past a damaged checkpoint,
    are left alone (the run replaces them when it gets there)."""
    older = [p for p in checkpoints(out) if _step_of(p) <= newest]
    for ckpt in older[:-keep]:
        try:
            shutil.rmtree(ckpt)
        except OSError as exc:
            warnings.warn(f"could not delete the old checkpoint {ckpt} ({exc})", TrainingWarning, stacklevel=2)
