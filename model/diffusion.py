"""The noise schedule, defined once and imported by training and sampling.

Stable Diffusion's "scaled linear" betas (0.00085 -> 0.012, 1000 steps) through diffusers'
schedulers; epsilon prediction; a network whose config says ``zero_terminal_snr`` uses the same
betas rescaled to end at pure noise (:func:`training_scheduler`). Timestep conventions: diffusers indexes steps k = 0..999;
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


def zero_snr(net) -> bool:
    """Whether ``net`` was trained on the zero-terminal-SNR schedule (its config's
    ``zero_terminal_snr``; absent: the released schedule)."""
    return bool(getattr(net.config, "zero_terminal_snr", False))


def prediction(net) -> str:
    """What ``net`` outputs: ``epsilon`` or ``v`` (its config's ``prediction``; absent: epsilon)."""
    return getattr(net.config, "prediction", "epsilon")


def training_scheduler(zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training schedule: Stable Diffusion's scaled-linear betas, whose last step keeps
    ``sqrt(abar) = 0.068`` of the signal (SNR 0.0047); with ``zero_terminal_snr`` the betas
    rescaled so that the last step is pure noise (Lin et al. 2024, diffusers'
    ``rescale_betas_zero_snr``). On the released schedule a network learns to read the layout
    from the signal left at the last step, which pure sampling noise does not have: it then
    starts every sample from what the noise suggests instead of what the conditions say."""
    return DDPMScheduler(**SCHEDULE, clip_sample=False, rescale_betas_zero_snr=zero_terminal_snr)


SPACINGS = ("karras", "linspace")


def sampling_scheduler(steps: int, spacing: str = "karras", zero_terminal_snr: bool = False,
                       prediction: str = "epsilon") -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order multistep) on the same schedule, with ``steps`` steps.

    ``spacing='karras'`` places the steps by the noise levels of Karras et al. (2022), dense
    at low noise; ``'linspace'`` spaces the training timesteps evenly (diffusers' default).
    Both solve the same ODE; on an exactly solvable case (Gaussian data, see
    benchmarks/bench_network.py) 25 Karras steps are about 3x more accurate than 50 evenly spaced ones.
    On the ``zero_terminal_snr`` schedule (the last step's sigma is 4096) the solver takes the
    training steps that ``spacing`` picks on the released schedule (Karras: 999, 970, 938, ...,
    1, 0 for 25 steps; one fewer where two levels round to the same step, e.g. 49 of 50): the
    first is pure noise, the rest are at about the same noise levels as there (Karras levels
    computed on this schedule would spend most of the steps above sigma 100, where the state is
    noise either way). ``prediction`` is
    what the network outputs (``epsilon`` or ``v``), handed to the solver as is: at the zero-SNR
    schedule's first step the clean latent cannot be recovered from a noise prediction in float32
    (``(x - sigma eps) / alpha`` with sigma = 1 - 3e-8, alpha = 2.4e-4), from ``v`` it can
    (``alpha x - sigma v``)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown step spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    schedule = {**SCHEDULE, "prediction_type": "v_prediction" if prediction == "v" else "epsilon"}
    sched = DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=spacing == "karras")
    sched.set_timesteps(steps)
    if zero_terminal_snr:
        released = sorted(set(sched.timesteps.tolist()), reverse=True)  # Karras levels can share a step
        sched = DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2,
                                            rescale_betas_zero_snr=True)
        sched.set_timesteps(timesteps=released)
    return sched


def state_scales(sched: DPMSolverMultistepScheduler, index: int) -> tuple[float, float]:
    """``(alpha, sigma)`` of the solver's state ``x = alpha * x0 + sigma * eps`` before step
    ``index`` of ``sched`` (``index = len(sched.timesteps)``: after the last step, (1, 0) for
    the default final sigma of zero)."""
    s = float(sched.sigmas[index])
    alpha = 1.0 / (1.0 + s * s) ** 0.5
    return alpha, s * alpha


def alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """(1000,) float64 cumulative alphas, index k = diffusers step (see :func:`training_scheduler`)."""
    return training_scheduler(zero_terminal_snr).alphas_cumprod.double()


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


def predict_x0(net, latents: Mapping[str, torch.Tensor], timesteps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The clean latent each noisy modality's prediction implies (``(x_t - sqrt(1 - abar) eps) /
    sqrt(abar)``, or ``sqrt(abar) x_t - sqrt(1 - abar) v`` for a ``v`` network: defined at a
    zero-SNR schedule's last step too), on the network's schedule; clean inputs (n = 0) as given."""
    out = net(latents, timesteps)
    v_net = prediction(net) == "v"
    abar = alphas_cumprod(zero_snr(net)).to(next(iter(latents.values())).device)
    x0 = {}
    for m, pred in out.items():
        n = timesteps[m].reshape(-1).to(abar.device)
        a = abar[(n.long() - 1).clamp(min=0)].to(pred.dtype).view(-1, 1, 1, 1)
        x = latents[m].to(pred.dtype)
        clean = a.sqrt() * x - (1 - a).sqrt() * pred if v_net else (x - (1 - a).sqrt() * pred) / a.sqrt()
        x0[m] = torch.where((n > 0).view(-1, 1, 1, 1), clean, x)
    return x0


def noisy_inputs(x0: Mapping[str, torch.Tensor], steps: Mapping[str, torch.Tensor], noise: Mapping[str, torch.Tensor],
                 zero_terminal_snr: bool = False):
    """``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` per modality (x0 where k = -1) and the
    network timesteps n = k + 1."""
    abar = alphas_cumprod(zero_terminal_snr).to(next(iter(x0.values())).device)
    xs, ts = {}, {}
    for m, x in x0.items():
        k = steps[m].to(x.device)
        a = abar[k.clamp(min=0)].to(x.dtype).view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise[m]
        clean = (k < 0).view(-1, 1, 1, 1)
        xs[m] = torch.where(clean, x, noisy)
        ts[m] = (k + 1).to(torch.float32)
    return xs, ts


LOSS_WEIGHTINGS = ("eps", "min_snr", "x0")


def loss_weights(steps: torch.Tensor, weighting: str = "eps", gamma: float = 5.0,
                 zero_terminal_snr: bool = False) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE for diffusers steps ``steps`` (B,) in -1..999
    (-1: clean, weight 0), with ``SNR_k = abar_k / (1 - abar_k)``:

    - ``eps``: 1 (the paper's plain epsilon MSE);
    - ``min_snr``: ``min(SNR, gamma) / SNR`` (Hang et al., 2023): the easy low-noise steps
      count less;
    - ``x0``: ``min(1 / SNR, gamma)``: the error measured on the implied clean latent
      (``|x0 error|^2 = |eps error|^2 / SNR``), capped at ``gamma``. It puts the weight where
      the noisy input says little and the other modalities must say it: what a small model
      learns last under the plain loss (the cross-modal mapping)."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(LOSS_WEIGHTINGS)}")
    k = steps.cpu()
    abar = alphas_cumprod(zero_terminal_snr)[k.clamp(min=0)]
    snr = (abar / (1 - abar)).clamp(min=1e-12)  # the zero-SNR schedule's last step: the limits (x0: gamma, min_snr: 1)
    if weighting == "eps":
        w = torch.ones_like(snr)
    elif weighting == "min_snr":
        w = torch.clamp(snr, max=gamma) / snr
    else:
        w = torch.clamp(1 / snr, max=gamma)
    return torch.where(k >= 0, w, torch.zeros_like(w)).float()


def diffusion_loss(net, x0: Mapping[str, torch.Tensor], steps: Mapping[str, torch.Tensor],
                   generator: torch.Generator | None = None, weighting: str = "eps",
                   gamma: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over modalities of the epsilon-prediction MSE (clean inputs excluded from their
    own term: there is no noise to predict), each sample weighted by :func:`loss_weights`,
    averaged over the samples that are not clean. Returns the loss and each modality's term."""
    noise = {m: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for m, x in x0.items()}
    xs, ts = noisy_inputs(x0, steps, noise, zero_snr(net))
    pred = net(xs, ts)
    v_net = prediction(net) == "v"
    abar = alphas_cumprod(zero_snr(net)).to(next(iter(x0.values())).device)
    total, terms = 0.0, {}
    for m in x0:
        mask = (steps[m] >= 0).to(pred[m].device).float()  # (B,)
        w = mask if weighting == "eps" else loss_weights(steps[m], weighting, gamma, zero_snr(net)).to(pred[m].device)
        target = noise[m]
        if v_net:  # v = sqrt(abar) eps - sqrt(1 - abar) x0: the v-MSE is the epsilon MSE / abar
            a = abar[steps[m].clamp(min=0).to(abar.device)].to(x0[m].dtype).view(-1, 1, 1, 1)
            target = a.sqrt() * noise[m] - (1 - a).sqrt() * x0[m]
        per = ((pred[m].float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        term = (per * w).sum() / mask.sum().clamp(min=1)
        terms[m] = float(term.detach())
        total = total + term
    return total, terms
