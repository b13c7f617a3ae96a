"""Any-subset conditional sampling with DPM-Solver++.

Conditions are fed clean at timestep 0 and never changed. Generated modalities start from
noise and are solved jointly. Modalities neither given nor asked for are marginalised the
UniDiffuser way: one fixed noise draw, fed at the final timestep (1000) at every network
call.

Optional per-condition classifier-free guidance without retraining, composed the standard
way (compositional CFG, Liu et al. 2022): with ``e_c`` the fully conditional prediction and
``e_{-m}`` the prediction with only condition ``m`` dropped (replaced by its fixed noise at the
final timestep),

    ``eps = e_c + sum_m w_m * (e_c - e_{-m})``.

Every condition's term comes from the same ``e_c``: no cross terms, and the order in which
the conditions are given does not matter. For one condition this is the usual
``eps = e_unc + s * (e_c - e_unc)`` with ``s = 1 + w``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from model.diffusion import NOISE_TIMESTEP, predict_eps, sampling_scheduler


def _expand(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.repeat_interleave(n, dim=0) if n > 1 else x


@torch.no_grad()
def generate(
    net,
    condition: Mapping[str, torch.Tensor],
    generate: Sequence[str],
    n_samples: int = 1,
    steps: int = 50,
    seed: int | None = None,
    initial_noise: Mapping[str, torch.Tensor] | None = None,
    guidance: Mapping[str, float] | None = None,
    batch_size: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    marginal_noise: Mapping[str, torch.Tensor] | None = None,
    spacing: str = "karras",
) -> dict[str, torch.Tensor]:
    """Generate the modalities ``generate`` given ``condition`` (latents in the network's
    space, each (B, C, H, W)). Returns {modality: (B * n_samples, C, H, W)} for the generated
    and the condition modalities (samples of one input are consecutive; each condition row is
    repeated for its ``n_samples`` samples and returned as given). To give every sample its own
    condition (e.g. its own posterior draw), pass one row per sample and ``n_samples=1``.
    ``initial_noise`` fixes the starting noise of generated modalities ((B * n_samples, C, H, W)
    each); ``guidance`` = {condition: w} adds classifier-free guidance on those conditions,
    composed as in the module docstring; ``batch_size`` bounds a network call.
    ``marginal_noise`` fixes the noise standing in for modalities that are neither given nor
    generated (and for guided conditions when they are dropped); by default it is drawn from
    ``seed``. ``spacing`` places the solver steps (see
    :func:`model.diffusion.sampling_scheduler`)."""
    names = list(net.config.modalities)
    unknown = [m for m in list(condition) + list(generate) if m not in names]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; the network models {names}")
    overlap = set(condition) & set(generate)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both conditions and generated")
    if not generate:
        raise ValueError("nothing to generate")
    guidance = dict(guidance or {})
    bad = [m for m in guidance if m not in condition]
    if bad:
        raise ValueError(f"guidance given for {bad}, which are not conditions")
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    if condition:
        b = next(iter(condition.values())).shape[0]
        shape = tuple(next(iter(condition.values())).shape[1:])
    elif initial_noise:  # unconditional: the batch is the starting noise given
        first = next(iter(initial_noise.values()))
        b, shape = max(first.shape[0] // n_samples, 1), tuple(first.shape[1:])
    else:
        b = 1
        shape = latent_shape or (net.config.in_chans, net.config.img_size, net.config.img_size)
    total = b * n_samples
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed())
    cond = {m: _expand(x.to(device, torch.float32), n_samples) for m, x in condition.items()}
    free = [m for m in names if m not in condition and m not in generate]
    guided = [m for m in names if m in guidance]  # network order: nothing depends on the order of ``guidance``
    fixed_noise = {}
    for m in free + guided:
        given = marginal_noise.get(m) if marginal_noise is not None else None
        fixed_noise[m] = (given.to(device, torch.float32) if given is not None
                          else torch.randn((total, *shape), generator=gen).to(device))
        if tuple(fixed_noise[m].shape) != (total, *shape):
            raise ValueError(f"marginal noise of {m} has shape {tuple(fixed_noise[m].shape)}; expected {(total, *shape)}")
    x = {}
    for m in generate:
        if initial_noise is not None and m in initial_noise:
            x[m] = initial_noise[m].to(device, torch.float32)
            if tuple(x[m].shape) != (total, *shape):
                raise ValueError(f"initial noise of {m} has shape {tuple(x[m].shape)}; expected {(total, *shape)}")
        else:
            x[m] = torch.randn((total, *shape), generator=gen).to(device)
    sched = sampling_scheduler(steps, spacing)
    x_flat = torch.cat([x[m] for m in generate], dim=1)  # solve the generated modalities jointly
    split = [x[m].shape[1] for m in generate]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" and dtype == torch.float32 else _null()

    def eps_of(xg: dict[str, torch.Tensor], k: int, drop: str | None) -> dict[str, torch.Tensor]:
        lat, ts = {}, {}
        for m in names:
            if m in generate:
                lat[m], ts[m] = xg[m], torch.full((total,), float(k + 1), device=device)
            elif m in cond and m != drop:
                lat[m], ts[m] = cond[m], torch.zeros(total, device=device)
            else:
                lat[m], ts[m] = fixed_noise[m], torch.full((total,), NOISE_TIMESTEP, device=device)
        with autocast:
            out = _batched(net, lat, ts, batch_size)
        return {m: out[m].float() for m in generate}

    for k in sched.timesteps:
        k = int(k)
        xg = dict(zip(generate, x_flat.split(split, dim=1)))
        full = eps_of(xg, k, None)
        eps = _guided(full, {m: eps_of(xg, k, m) for m in guided}, guidance)
        eps_flat = torch.cat([eps[m] for m in generate], dim=1)
        x_flat = sched.step(eps_flat, k, x_flat).prev_sample
    result = {m: _expand(condition[m], n_samples) for m in condition}  # the inputs, untouched
    result.update(zip(generate, x_flat.split(split, dim=1)))
    return result


def _guided(full: dict[str, torch.Tensor], dropped: Mapping[str, dict[str, torch.Tensor]],
            weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Compositional classifier-free guidance: ``e_c + sum_m w_m (e_c - e_{-m})`` per generated
    modality, with ``full`` = {generated: e_c} and ``dropped`` = {condition m: {generated:
    e_{-m}}}, each (B, C, H, W); the terms are added in ``dropped``'s order. No guidance: ``full``."""
    eps = dict(full)
    for m, without in dropped.items():
        eps = {g: eps[g] + weights[m] * (full[g] - without[g]) for g in eps}
    return eps


def _batched(net, lat, ts, batch_size):
    """The noise predictions (:func:`model.diffusion.predict_eps`) in calls of ``batch_size``."""
    total = next(iter(lat.values())).shape[0]
    if batch_size is None or batch_size >= total:
        return predict_eps(net, lat, ts)
    parts = [predict_eps(net, {m: v[i:i + batch_size] for m, v in lat.items()}, {m: v[i:i + batch_size] for m, v in ts.items()})
             for i in range(0, total, batch_size)]
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def chain(net, start: Mapping[str, torch.Tensor], a: Sequence[str], b: Sequence[str], n: int, **kwargs) -> list[dict[str, torch.Tensor]]:
    """The looping experiment: generate ``b`` from ``a``, then ``a`` from the generated ``b``,
    ``n`` times. Returns every intermediate result."""
    current = dict(start)
    out = []
    src, dst = list(a), list(b)
    for _ in range(n):
        res = generate(net, {m: current[m] for m in src}, dst, **kwargs)
        out.append(res)
        current = res
        src, dst = dst, src
    return out
