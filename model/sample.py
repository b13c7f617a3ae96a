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

:func:`chain` is the looping experiment (b from a, a from the generated b, ...), whatever
makes one generation: :func:`network_step` on a network, or a caller's own step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from model.canvas import Canvas
from model.diffusion import NOISE_TIMESTEP, prediction, sampling_scheduler, state_scales, zero_snr

# One generation of the looping experiment (see :func:`chain`): ``step(condition, generate,
# iteration)`` -> {modality: latents} holding at least the modalities ``generate``.
Step = Callable[[dict[str, torch.Tensor], list[str], int], Mapping[str, torch.Tensor]]


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
    guidance: Mapping[str | tuple[str, ...], float] | None = None,
    batch_size: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    marginal_noise: Mapping[str, torch.Tensor] | None = None,
    spacing: str = "karras",
    stride: int | None = None,
    known: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    resample: int = 0,
    resample_noise: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
    guidance_min_sigma: float = 0.0,
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Generate the modalities ``generate`` given ``condition`` (latents in the network's
    space, each (B, C, H, W)). Returns {modality: (B * n_samples, C, H, W)} for the generated
    and the condition modalities (samples of one input are consecutive; each condition row is
    repeated for its ``n_samples`` samples and returned as given). To give every sample its own
    condition (e.g. its own posterior draw), pass one row per sample and ``n_samples=1``.
    ``initial_noise`` fixes the starting noise of generated modalities ((B * n_samples, C, H, W)
    each); ``guidance`` = {condition: w} adds classifier-free guidance on those conditions,
    composed as in the module docstring (a key may be a tuple of conditions, dropped together:
    ``{("S2L1C", "S2L2A"): w}`` is the usual ``e_unc + (1 + w)(e_c - e_unc)`` on both at one
    extra network call), at the solver steps whose noise level sigma (noise over
    signal, ``x = alpha (x0 + sigma eps)``) is at least ``guidance_min_sigma`` (a guidance
    interval, Kynkaanniemi et al. 2024: the conditions place things while the state is noisy;
    measured in :mod:`pipelines.guidance`, guiding only there does as well at fewer network
    calls); ``batch_size`` bounds a network call. ``known`` = {generated modality: (x0, keep)}
    puts x0 back where keep is 1 before every step (gap filling, see :func:`_known_part`);
    with ``strength`` < 1 (diffusers' img2img/inpainting meaning) the parts where keep is 0
    do not start from pure noise but from x0 noised to the level of step ``steps - round(strength
    * steps)`` (SDEdit, Meng et al. 2022): the earlier steps are skipped when every generated
    modality is known, else x0 is put everywhere until then.
    ``marginal_noise`` fixes the noise standing in for modalities that are neither given nor
    generated (and for guided conditions when they are dropped); by default it is drawn from
    ``seed``. ``spacing`` places the solver steps (see
    :func:`model.diffusion.sampling_scheduler`).

    Latents larger than the network's input (e.g. a grid cell's 4x4 fragments side by side,
    ``(B, C, 128, 128)``) are a canvas (:mod:`model.canvas`): denoised as overlapping windows
    of the network's size whose starts are at most ``stride`` apart (default: 3/4 of a
    window), merged at every solver step, so neighbouring parts agree."""
    names = list(net.config.modalities)
    guidance = _check_request(names, condition, generate, guidance)
    device = next(net.parameters()).device
    b, shapes = _batch_shapes(net, condition, initial_noise, n_samples, latent_shape)
    full = {m: (b * n_samples, *shape) for m, shape in shapes.items()}
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed())
    free = [m for m in names if m not in condition and m not in generate]
    # network order: nothing depends on the order of ``guidance``
    guided = sorted(guidance, key=lambda group: sorted(names.index(m) for m in group))
    dropped = [m for m in names if any(m in group for group in guided)]
    # the draw order (marginal noise, then starting noise) is part of what a seed means
    fixed_noise = _noise(marginal_noise, free + dropped, "marginal noise", full, gen, device)
    start = _noise(initial_noise, generate, "initial noise", full, gen, device)
    canvas = _canvas(net, shapes, stride)
    cond = {m: _expand(x.to(device, torch.float32), n_samples) for m, x in condition.items()}
    if canvas is not None:  # the network sees windows: the fixed inputs are cut once
        cond = {m: canvas.crop(x) for m, x in cond.items()}
        fixed_noise = {m: canvas.crop(x) for m, x in fixed_noise.items()}
    call = _NetworkCall(net, names, list(generate), cond, fixed_noise, batch_size, canvas)
    result = {m: _expand(condition[m], n_samples) for m in condition}  # the inputs, untouched
    sched = sampling_scheduler(steps, spacing, zero_snr(net), prediction(net))
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    first = steps - max(1, round(strength * steps)) if strength < 1 and known else None
    impose = _known_part(known or {}, list(generate), start, full, device, first)
    skip = first if first is not None and all(m in known for m in generate) else 0
    if skip:
        sched.set_begin_index(skip)  # the solver's history starts there (a first-order step)
    if resample > 0 and impose is not None:
        def fresh(i: int) -> dict[str, torch.Tensor]:
            given = resample_noise(i) if resample_noise is not None else None
            return _noise(given, list(generate), "resampling noise", full, gen, device)

        result.update(_solve_resampling(call, start, guided, guidance, sched, impose, resample, fresh, guidance_min_sigma,
                                        skip))
    else:
        result.update(_solve(call, start, guided, guidance, sched, impose, guidance_min_sigma, skip))
    return result


def _known_part(known: Mapping[str, tuple[torch.Tensor, torch.Tensor]], generate: list[str],
                start: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], device: torch.device,
                everywhere_until: int | None = None):
    """The function ``impose(x_flat, alpha, sigma, noise=None, step=None)`` that puts the
    known latents, noised to the level (alpha, sigma) with each modality's starting noise,
    where they are kept (on the generated modalities flattened and concatenated, as
    :func:`_solve` holds them); before solver steps up to ``everywhere_until`` the given
    latents of the modalities in ``known`` are put everywhere, their keep mask ignored
    (SDEdit's start); None when nothing is known."""
    bad = [m for m in known if m not in generate]
    if bad:
        raise ValueError(f"known latents given for {bad}, which are not generated")
    if not known:
        return None
    x0s, keeps, givens = [], [], []
    for m in generate:
        shape = shapes[m]
        if m in known:
            x0, keep = (v.to(device, torch.float32) for v in known[m])
            if tuple(x0.shape) != tuple(shape) or keep.ndim != 4 or keep.shape[1] != 1 or keep.shape[0] not in (1, shape[0]) \
                    or tuple(keep.shape[-2:]) != tuple(shape[-2:]):
                raise ValueError(f"known latents of {m}: x0 {tuple(x0.shape)} and keep {tuple(keep.shape)} do not fit "
                                 f"{tuple(shape)} (keep: (B or 1, 1, H, W))")
            if float(keep.min()) < 0 or float(keep.max()) > 1:
                raise ValueError(f"the keep mask of {m} must lie in [0, 1]")
        else:
            x0, keep = torch.zeros(shape, device=device), torch.zeros((1, 1, *shape[-2:]), device=device)
        x0s.append(x0.flatten(1))
        keeps.append(keep.expand(shape[0], shape[1], -1, -1).flatten(1))
        givens.append(torch.full((1, x0[0].numel()), float(m in known), device=device))
    x0_flat, keep_flat, given_flat = torch.cat(x0s, dim=1), torch.cat(keeps, dim=1), torch.cat(givens, dim=1)
    noise_flat = _flat(start, generate)

    def impose(x_flat: torch.Tensor, alpha: float, sigma: float, noise: torch.Tensor | None = None,
               step: int | None = None) -> torch.Tensor:
        noise = noise_flat if noise is None else noise
        everywhere = everywhere_until is not None and step is not None and step <= everywhere_until
        keep = given_flat if everywhere else keep_flat
        return keep * (alpha * x0_flat + sigma * noise) + (1 - keep) * x_flat

    return impose


def _flat(x: Mapping[str, torch.Tensor], order: Sequence[str]) -> torch.Tensor:
    """The modalities ``order`` of ``x``, each (B, C, H, W) flattened to (B, C*H*W), side by side:
    the solver's state, whatever each modality's shape."""
    return torch.cat([x[m].flatten(1) for m in order], dim=1)


def _unflat(x_flat: torch.Tensor, like: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_flat`: {modality: tensor of ``like[modality]``'s shape}."""
    parts = x_flat.split([like[m][0].numel() for m in order], dim=1)
    return {m: part.reshape(like[m].shape) for m, part in zip(order, parts)}


def _check_request(names: Sequence[str], condition: Mapping[str, torch.Tensor], generate: Sequence[str],
                   guidance: Mapping[str | tuple[str, ...], float] | None) -> dict[tuple[str, ...], float]:
    """Refuse modalities the network does not model, a modality both given and generated,
    nothing to generate, or guidance on what is not a condition; returns the guidance as
    {group of conditions dropped together: w}."""
    unknown = [m for m in list(condition) + list(generate) if m not in names]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; the network models {list(names)}")
    overlap = set(condition) & set(generate)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both conditions and generated")
    if not generate:
        raise ValueError("nothing to generate")
    groups = {((key,) if isinstance(key, str) else tuple(key)): float(w) for key, w in (guidance or {}).items()}
    bad = sorted({m for group in groups for m in group if m not in condition})
    if bad or any(not group for group in groups):
        raise ValueError(f"guidance given for {bad or 'an empty group'}, which are not conditions")
    return groups


def _batch_shapes(net, condition: Mapping[str, torch.Tensor], initial_noise: Mapping[str, torch.Tensor] | None,
                  n_samples: int, latent_shape: tuple[int, int, int] | None) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The number of inputs B and each modality's latent shape (C, H, W). A network whose
    modalities share one shape: that of the conditions (a canvas may be larger than the
    network), else of the starting noise given (unconditional), else ``latent_shape``
    (default: the network's). A network of per-modality shapes (the native family): its own."""
    shapes = getattr(net, "latent_shapes", None)
    first = next(iter(condition.values()), None)
    noise = next(iter((initial_noise or {}).values()), None)
    b = first.shape[0] if first is not None else max(noise.shape[0] // n_samples, 1) if noise is not None else 1
    names = list(net.config.modalities)
    if shapes is not None and len(set(shapes.values())) > 1:
        return b, {m: tuple(shapes[m]) for m in names}
    if first is not None:
        shape = tuple(first.shape[1:])
    elif noise is not None:
        shape = tuple(noise.shape[1:])
    else:
        shape = tuple(latent_shape or net.latent_shape())
    return b, {m: shape for m in names}


def _canvas(net, shapes: Mapping[str, tuple[int, ...]], stride: int | None) -> Canvas | None:
    """The windows of latents of the shared shape (C, H, W) larger than the network's input;
    None when they are the network's size (or the modalities' shapes differ: no canvas)."""
    if len(set(shapes.values())) > 1:
        return None
    shape = next(iter(shapes.values()))
    size = net.config.img_size
    if tuple(shape[-2:]) == (size, size):
        return None
    return Canvas(shape[-2], shape[-1], size, stride or max(size * 3 // 4, 1))


def _noise(given: Mapping[str, torch.Tensor] | None, modalities: Sequence[str], what: str,
           shapes: Mapping[str, tuple[int, ...]], gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Float32 noise of ``shapes[m]`` = (B * n_samples, C, H, W) on ``device`` for each of
    ``modalities``, in their order: the one ``given``, else a draw from ``gen``; a given one of
    another shape is refused (``what`` names it)."""
    out = {}
    for m in modalities:
        fixed = given.get(m) if given is not None else None
        shape = tuple(shapes[m])
        out[m] = fixed.to(device, torch.float32) if fixed is not None else torch.randn(shape, generator=gen).to(device)
        if tuple(out[m].shape) != shape:
            raise ValueError(f"{what} of {m} has shape {tuple(out[m].shape)}; expected {shape}")
    return out


@dataclass
class _NetworkCall:
    """What every network call of one :func:`generate` shares: conditions fed clean at
    timestep 0, the fixed noise of the other modalities (and of a dropped condition) at the
    final timestep; each ``(B * n_samples, C, H, W)`` on the network's device."""

    net: torch.nn.Module
    names: list[str]
    generate: list[str]
    cond: dict[str, torch.Tensor]
    fixed_noise: dict[str, torch.Tensor]
    batch_size: int | None
    canvas: Canvas | None = None  # set: ``cond`` and ``fixed_noise`` are its windows

    def predict(self, xg: Mapping[str, torch.Tensor], k: int, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Float32 predictions (noise or v: :func:`model.diffusion.prediction`) of the generated modalities ``xg`` at diffusers step ``k``,
        with the conditions ``drop`` replaced by their fixed noise. On a canvas: the
        windows' predictions, merged (:meth:`model.canvas.Canvas.merge`)."""
        if self.canvas is not None:
            out = self._predict({m: self.canvas.crop(x) for m, x in xg.items()}, k, drop)
            return {m: self.canvas.merge(v) for m, v in out.items()}
        return self._predict(xg, k, drop)

    def _predict(self, xg: Mapping[str, torch.Tensor], k: int, drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
        x = next(iter(xg.values()))
        total, device = x.shape[0], x.device
        lat, ts = {}, {}
        for m in self.names:
            if m in self.generate:
                lat[m], ts[m] = xg[m], torch.full((total,), float(k + 1), device=device)
            elif m in self.cond and m not in drop:
                lat[m], ts[m] = self.cond[m], torch.zeros(total, device=device)
            else:
                lat[m], ts[m] = self.fixed_noise[m], torch.full((total,), NOISE_TIMESTEP, device=device)
        with _autocast(self.net):
            out = _batched(self.net, lat, ts, self.batch_size)
        return {m: out[m].float() for m in self.generate}


def _autocast(net) -> contextlib.AbstractContextManager:
    """bf16 autocast for a float32 network on a GPU; nothing otherwise."""
    param = next(net.parameters())
    if param.device.type == "cuda" and param.dtype == torch.float32:
        return torch.autocast(param.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _solve(call: _NetworkCall, start: Mapping[str, torch.Tensor], guided: Sequence[tuple[str, ...]], guidance: Mapping[tuple[str, ...], float],
           sched, impose=None, guidance_min_sigma: float = 0.0, skip: int = 0) -> dict[str, torch.Tensor]:
    """Run the solver ``sched`` from the starting noise of the generated modalities, solved
    jointly (concatenated along channels), with guidance on the conditions ``guided`` at the
    steps whose noise level is at least ``guidance_min_sigma``, and
    the known latents put back before every step and after the last (``impose``, see
    :func:`_known_part`); the first ``skip`` steps are not taken (the known latents, put
    everywhere, stand in for them); returns {generated modality: (B * n_samples, C, H, W)}."""
    generate = call.generate
    x_flat = _flat(start, generate)
    for i, k in enumerate(sched.timesteps):
        if i < skip:
            continue
        k = int(k)
        if impose is not None:
            x_flat = impose(x_flat, *state_scales(sched, i), step=i)
        guide = guided if float(sched.sigmas[i]) >= guidance_min_sigma else ()
        x_flat = sched.step(_prediction_flat(call, x_flat, start, k, guide, guidance), k, x_flat).prev_sample
    if impose is not None:
        x_flat = impose(x_flat, *state_scales(sched, len(sched.timesteps)))
    return _unflat(x_flat, start, generate)


def _prediction_flat(call: _NetworkCall, x_flat: torch.Tensor, like: Mapping[str, torch.Tensor], k: int,
              guided: Sequence[tuple[str, ...]], guidance: Mapping[tuple[str, ...], float]) -> torch.Tensor:
    """The guided prediction (noise or v; guidance and window merging are linear, so either composes
    the same) for the state ``x_flat`` (the generated modalities
    flattened side by side, each of ``like[m]``'s shape) at diffusers step ``k``, laid out the same way."""
    xg = _unflat(x_flat, like, call.generate)
    pred = _guided(call.predict(xg, k), {group: call.predict(xg, k, group) for group in guided}, guidance)
    return _flat(pred, call.generate)


RESAMPLE_UNTIL = 0.6  # the share of the solver steps (the noisy ones) that are resampled


def _solve_resampling(call: _NetworkCall, start: Mapping[str, torch.Tensor], guided: Sequence[tuple[str, ...]],
                      guidance: Mapping[tuple[str, ...], float], sched, impose, jumps: int, fresh,
                      guidance_min_sigma: float = 0.0, skip: int = 0) -> dict[str, torch.Tensor]:
    """:func:`_solve` with RePaint's resampling, on first-order steps at the levels of
    ``sched``: the prediction's ``x0`` and ``eps`` (:func:`_clean_and_noise`), then ``x' = alpha' x0 + sigma' eps``. In the
    first :data:`RESAMPLE_UNTIL` of the steps, each step is followed ``jumps`` times by a
    forward jump back to its level, ``x = (alpha / alpha') x' + sqrt(sigma^2 - (alpha sigma' /
    alpha')^2) z``, and taken again; the known part is put back (freshly noised) before every
    network call; the first ``skip`` steps are not taken. ``fresh(i)`` gives the i-th fresh noise draw."""
    generate = call.generate
    x_flat = _flat(start, generate)
    draws = 0

    def next_noise() -> torch.Tensor:
        nonlocal draws
        noise = fresh(draws)
        draws += 1
        return _flat(noise, generate)

    steps = len(sched.timesteps)
    for i, k in enumerate(sched.timesteps):
        if i < skip:
            continue
        k = int(k)
        alpha, sigma = state_scales(sched, i)
        alpha_next, sigma_next = state_scales(sched, i + 1)
        repeats = jumps if i < RESAMPLE_UNTIL * steps else 0
        guide = guided if float(sched.sigmas[i]) >= guidance_min_sigma else ()
        for j in range(repeats + 1):
            x_flat = impose(x_flat, alpha, sigma, None if i == skip and j == 0 else next_noise(), step=i)
            clean, eps = _clean_and_noise(_prediction_flat(call, x_flat, start, k, guide, guidance), x_flat, alpha, sigma,
                                          prediction(call.net))
            x_flat = alpha_next * clean + sigma_next * eps
            if j < repeats:
                ratio = alpha / alpha_next
                spread = max(sigma ** 2 - (ratio * sigma_next) ** 2, 0.0) ** 0.5
                x_flat = ratio * x_flat + spread * next_noise()
    x_flat = impose(x_flat, *state_scales(sched, steps))
    return _unflat(x_flat, start, generate)


def _guided(full: dict[str, torch.Tensor], dropped: Mapping[tuple[str, ...], dict[str, torch.Tensor]],
            weights: Mapping[tuple[str, ...], float]) -> dict[str, torch.Tensor]:
    """Compositional classifier-free guidance: ``e_c + sum_g w_g (e_c - e_{-g})`` per generated
    modality, with ``full`` = {generated: e_c} and ``dropped`` = {group of conditions g:
    {generated: e_{-g}}}, each (B, C, H, W); the terms are added in ``dropped``'s order. No
    guidance: ``full``."""
    eps = dict(full)
    for m, without in dropped.items():
        eps = {g: eps[g] + weights[m] * (full[g] - without[g]) for g in eps}
    return eps


def _clean_and_noise(pred: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction: str):
    """``(x0, eps)`` implied by the network output ``pred`` for the state ``x = alpha x0 + sigma
    eps`` (``alpha^2 + sigma^2 = 1``)."""
    if prediction == "v":  # v = alpha eps - sigma x0
        return alpha * x - sigma * pred, sigma * x + alpha * pred
    return (x - sigma * pred) / alpha, pred


def _batched(net, lat, ts, batch_size):
    """The network's raw predictions (noise or v, :func:`model.diffusion.prediction`) in calls of ``batch_size``."""
    total = next(iter(lat.values())).shape[0]
    if batch_size is None or batch_size >= total:
        return net(lat, ts)
    parts = [net({m: v[i:i + batch_size] for m, v in lat.items()}, {m: v[i:i + batch_size] for m, v in ts.items()})
             for i in range(0, total, batch_size)]
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


def chain(step: Step, start: Mapping[str, torch.Tensor], a: Sequence[str], b: Sequence[str],
          n: int) -> list[dict[str, torch.Tensor]]:
    """The looping experiment: generate ``b`` from ``a`` (taken from ``start``), then ``a`` from
    the generated ``b``, and so on, ``n`` generations. ``step(condition, generate, iteration)``
    makes one generation (``iteration`` counts from 0: e.g. seed + iteration); it gets the
    latents of the other side, {modality: (B, C, H, W)}. Returns one dict per iteration
    holding the modalities generated in it."""
    a, b = list(a), list(b)
    if not a or not b or set(a) & set(b):
        raise ValueError(f"the two sides of a chain must be non-empty and disjoint; got {a} and {b}")
    missing = [m for m in a if m not in start]
    if missing:
        raise ValueError(f"the chain starts from {a}; start lacks {missing}")
    current, src, dst = dict(start), a, b
    out = []
    for iteration in range(n):
        made = step({m: current[m] for m in src}, list(dst), iteration)
        if any(m not in made for m in dst):
            raise ValueError(f"iteration {iteration}: the step returned {sorted(made)}, not all of {dst}")
        current = {m: made[m] for m in dst}
        out.append(current)
        src, dst = dst, src
    return out


def network_step(net, seed: int = 0, **kwargs) -> Step:
    """A :func:`chain` step that samples with :func:`generate` on ``net``, seed ``seed +
    iteration``; ``kwargs`` go to :func:`generate` (steps, n_samples=1, guidance, ...)."""
    def step(condition: dict[str, torch.Tensor], modalities: list[str], iteration: int) -> dict[str, torch.Tensor]:
        return generate(net, condition, modalities, seed=seed + iteration, **kwargs)

    return step
