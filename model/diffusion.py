"""The noise schedule, defined once and imported by training and sampling.

Stable Diffusion's "scaled linear" betas (0.00085 -> 0.012, 1000 steps) through diffusers'
schedulers; epsilon prediction. Timestep conventions: diffusers indexes steps k = 0..999;
the network is fed ``n = k + 1`` (1..1000) for noisy inputs and 0 for clean ones, as the
released COP-GEN-Beta weights expect. ``NOISE_TIMESTEP`` (1000) marks pure noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
NOISE_TIMESTEP = float(NUM_TRAIN_TIMESTEPS)  # network input for "pure noise"
SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                beta_schedule="scaled_linear", prediction_type="epsilon")


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


SPACINGS = ("karras", "linspace")


def sampling_scheduler(steps: int, spacing: str = "karras") -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order multistep) on the same schedule, with ``steps`` steps.

    ``spacing='karras'`` places the steps by the noise levels of Karras et al. (2022), dense
    at low noise; ``'linspace'`` spaces the training timesteps evenly (diffusers' default).
    Both solve the same ODE; on an exactly solvable case (Gaussian data, see
    benchmarks/model.py) 25 Karras steps are about 3x more accurate than 50 evenly spaced ones."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown step spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    sched = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=spacing == "karras")
    sched.set_timesteps(steps)
    return sched


def alphas_cumprod() -> torch.Tensor:
    """(1000,) float64 cumulative alphas, index k = diffusers step."""
    return training_scheduler().alphas_cumprod.double()


def draw_timesteps(batch: int, modalities: list[str], *, p_clean: float = 0.1, p_drop: float = 0.0,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """An independent diffusers step per modality and sample: k in -1..999 where -1 means
    "clean" (fed at network timestep 0, as conditions are at sampling) with probability
    ``p_clean``, and 999 ("dropped": trained as pure noise so marginals are learned) with
    probability ``p_drop``."""
    out = {}
    for m in modalities:
        k = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        u = torch.rand(batch, generator=generator)
        k = torch.where(u < p_clean, torch.full_like(k, -1), k)
        k = torch.where((u >= p_clean) & (u < p_clean + p_drop), torch.full_like(k, NUM_TRAIN_TIMESTEPS - 1), k)
        out[m] = k
    return out


def noisy_inputs(x0: Mapping[str, torch.Tensor], steps: Mapping[str, torch.Tensor], noise: Mapping[str, torch.Tensor]):
    """``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` per modality (x0 where k = -1) and the
    network timesteps n = k + 1."""
    abar = alphas_cumprod().to(next(iter(x0.values())).device)
    xs, ts = {}, {}
    for m, x in x0.items():
        k = steps[m].to(x.device)
        a = abar[k.clamp(min=0)].to(x.dtype).view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise[m]
        clean = (k < 0).view(-1, 1, 1, 1)
        xs[m] = torch.where(clean, x, noisy)
        ts[m] = (k + 1).to(torch.float32)
    return xs, ts


def diffusion_loss(net, x0: Mapping[str, torch.Tensor], steps: Mapping[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over modalities of the epsilon-prediction MSE (clean inputs excluded from their
    own term: there is no noise to predict). Returns the loss and each modality's term."""
    noise = {m: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for m, x in x0.items()}
    xs, ts = noisy_inputs(x0, steps, noise)
    pred = net(xs, ts)
    total, terms = 0.0, {}
    for m in x0:
        w = (steps[m] >= 0).to(pred[m].dtype).to(pred[m].device)  # (B,)
        per = ((pred[m].float() - noise[m].float()) ** 2).mean(dim=(1, 2, 3))
        term = (per * w).sum() / w.sum().clamp(min=1)
        terms[m] = float(term.detach())
        total = total + term
    return total, terms
