"""Training the multimodal U-ViT on latent tuples, with accelerate.

Data: a mapping {modality: moments array (N, 8, H, W)} (aligned rows; see
``majortom_gen.store.load_aligned``); latents are sampled from the moments at every step
and brought to the network's space by each modality's :class:`model.codecs.LatentNorm`
(zero mean, unit variance). With ``hflip`` every tuple is mirrored left-right with
probability 1/2, all its modalities together (the paper's augmentation). Every random choice of step s (batch order, latent
samples, timesteps, noise) derives from (seed, s), so a resumed run continues exactly as
an uninterrupted one: a checkpoint holds the model, EMA, optimizer, LR scheduler and step.

Layout of ``out``::

    checkpoints/step-000100/  model (save_pretrained), ema.pt, optimizer.pt, scheduler.pt, state.json
    log.jsonl                 one line per logged step: step, loss, loss per modality, lr
    model/                    the EMA weights at the end (save_pretrained), what sampling loads
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from model.codecs import LatentNorm, sample_latents
from model.config import RunConfig
from model.diffusion import diffusion_loss, draw_timesteps
from model.uvit import MultiModalUViT


# The demo model shipped in the package: made by `majortom-gen train --config small` on the
# synthetic world (the command, cells, steps and hardware are in its training_data.json).
SHIPPED_DEMO_MODEL = Path(__file__).resolve().parent / "weights" / "demo-model"


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    losses: list[float]
    model_dir: Path


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


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


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
) -> TrainResult:
    """Train (or resume) and write checkpoints, a log and the final EMA model under ``out``.

    ``on_checkpoint(step, ema_network)`` runs after each checkpoint (e.g. to draw a sample grid).
    ``device='cpu'`` forces the CPU; otherwise accelerate picks the GPU(s) when present.
    ``init_from``: a model folder (same network config) whose weights start a new run
    (fine-tuning); ignored when resuming from a checkpoint."""
    out = Path(out)
    cfg, tcfg = config, config.train
    names = list(cfg.nnet.get("modalities", list(moments)))
    missing = [m for m in names if m not in moments]
    if missing:
        raise ValueError(f"the data lack modalities {missing} that the network models ({names})")
    if any(m not in norms for m in names):
        raise ValueError(f"no latent normalisation for {[m for m in names if m not in norms]}")
    n = len(next(iter(moments.values())))
    if n == 0:
        raise ValueError("no training tuples: the store has no fragment with all the network's modalities")
    total = max_steps if max_steps is not None else tcfg.max_steps
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=device == "cpu" or not torch.cuda.is_available())
    torch.manual_seed(tcfg.seed)
    net = MultiModalUViT(**cfg.nnet)
    ckpt = latest_checkpoint(out) if resume else None
    if init_from is not None and ckpt is None:
        start = MultiModalUViT.from_pretrained(init_from)
        differ = {k: (v, net.config.get(k)) for k, v in start.config.items()
                  if not k.startswith("_") and json.dumps(net.config.get(k)) != json.dumps(v)}
        if differ:
            raise ValueError(f"{init_from}: its network differs from the config's ({differ}); fine-tune with its own config")
        net.load_state_dict(start.state_dict())
    if tcfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
                            betas=cfg.optimizer.betas)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.optimizer.warmup_steps)
    ema = EMAModel(net.parameters(), decay=tcfg.ema_decay, model_cls=MultiModalUViT, model_config=net.config)
    step = 0
    if resume and ckpt is None and (out / "checkpoints").exists():
        raise ValueError(f"{out}: --resume but no checkpoint to resume from")
    if ckpt is not None:
        net.load_state_dict(MultiModalUViT.from_pretrained(ckpt / "model").state_dict())
        ema.load_state_dict(torch.load(ckpt / "ema.pt", weights_only=False))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        lr_sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        step = json.loads((ckpt / "state.json").read_text())["step"]
    elif not resume and (out / "checkpoints").exists():
        raise ValueError(f"{out}: holds checkpoints of an earlier run; pass --resume or use another --out")
    net, opt, lr_sched = accelerator.prepare(net, opt, lr_sched)
    ema.to(accelerator.device)
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    arrays = {m: moments[m] for m in names}
    loss_value = float("nan")
    _truncate_log(out / "log.jsonl", step)
    with open(out / "log.jsonl", "a") as log:
        while step < total:
            gen = _step_generator(tcfg.seed, step)
            idx = np.sort(batch_indices(step, n, tcfg.batch_size, tcfg.seed))
            x0 = {m: norms[m].to_network(sample_latents(torch.from_numpy(np.asarray(a[idx], dtype=np.float32)), 1.0, gen))
                  for m, a in arrays.items()}
            if tcfg.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x0 = {m: torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) for m, x in x0.items()}
            x0 = {m: x.to(accelerator.device) for m, x in x0.items()}
            steps = draw_timesteps(len(idx), names, p_clean=tcfg.p_clean, p_drop=tcfg.p_drop, generator=gen)
            net.train()
            with accelerator.autocast():
                loss, terms = diffusion_loss(net, x0, steps, generator=gen, weighting=tcfg.loss_weighting,
                                             gamma=tcfg.loss_gamma)
            accelerator.backward(loss)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(accelerator.unwrap_model(net).parameters())
            step += 1
            loss_value = float(loss.detach())
            losses.append(loss_value)
            if step % tcfg.log_every == 0 or step == total:
                log.write(json.dumps({"step": step, "loss": loss_value, **{f"loss_{m}": v for m, v in terms.items()},
                                      "lr": lr_sched.get_last_lr()[0]}) + "\n")
                log.flush()
            if step % tcfg.checkpoint_every == 0 or step == total:
                _save_checkpoint(out, step, accelerator.unwrap_model(net), ema, opt, lr_sched, config)
                if on_checkpoint is not None:
                    on_checkpoint(step, _ema_network(ema, cfg.nnet, accelerator.device))
            if progress:
                progress(step, total, loss_value)
    _atomic_save_pretrained(_ema_network(ema, cfg.nnet, "cpu"), out / "model")
    record = {**config.as_dict(), "latent_norm": {m: norms[m].as_dict() for m in names},
              "init_from": str(init_from) if init_from is not None else None}
    (out / "model" / "run_config.json").write_text(json.dumps(record, indent=1))
    return TrainResult(step, loss_value, losses, out / "model")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from), so that
    a resumed run's log equals an uninterrupted one's."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def _ema_network(ema: EMAModel, nnet: dict, device) -> MultiModalUViT:
    """A fresh network holding the EMA weights (the training network is left untouched)."""
    net = MultiModalUViT(**nnet).to(device)
    ema.copy_to(net.parameters())
    return net.eval()


def _atomic_save_pretrained(net: MultiModalUViT, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    net.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _save_checkpoint(out: Path, step: int, net, ema: EMAModel, opt, lr_sched, config: RunConfig) -> None:
    """Write a checkpoint folder under a temporary name and rename it: complete or absent."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    net.save_pretrained(tmp / "model")
    torch.save(ema.state_dict(), tmp / "ema.pt")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_sched.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config.as_dict()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
