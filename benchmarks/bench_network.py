"""Model benchmarks, figures as ratios to baselines measured in the same run.

    python benchmarks/bench_network.py [--train-steps 20] [--reference-steps 250] [--quick]

1. Solver sweep: generate with 10/15/20/25/50 DPM-Solver++ steps, Karras and evenly spaced,
   on a fixed network and fixed starting noise; report each one's RMS error against a
   250-step reference solution, relative to the 50-step evenly spaced error; and the same on
   Gaussian data, where the exact solution is known (so users can pick fewer steps knowingly).
2. Throughput: forward+backward train steps/s and 4-modality sampling tuples/s for the
   `tiny` config on the CPU (and `paper` / `release` on a GPU when present), with model FLOPs
   utilisation against the device's peak when known; the `small` config (the demo model's) in
   fp32 and, where the CPU has native bf16 (AVX512-BF16, AMX), in bf16 autocast, as a ratio
   (what `train --mixed-precision bf16` buys on this CPU).

``--quick`` (CI: every section runs and prints, in seconds): the sweep on 2 samples against a
60-step reference, and 2 train steps and one sampling run at batch 4 (2 on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import load_config
from model.diffusion import (
    SPACINGS,
    alphas_cumprod,
    diffusion_loss,
    draw_timesteps,
    sampling_scheduler,
)
from model.sample import generate
from model.uvit import MultiModalUViT

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def model_flops_per_sample(net: MultiModalUViT) -> float:
    """Forward FLOPs of one sample (2 x multiply-adds): linear layers plus attention."""
    c = net.config
    m = len(c.modalities)
    tokens = m + m * (c.img_size // c.patch_size) ** 2
    d, hidden = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    per_block = 2 * tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * tokens * tokens * d
    blocks = c.depth + 1
    skips = (c.depth // 2) * 2 * tokens * 2 * d * d
    io = 2 * m * (c.img_size // c.patch_size) ** 2 * d * (c.patch_size**2 * c.in_chans) * 2
    return float(blocks * per_block + skips + io)


def solver_sweep(net: MultiModalUViT, ref_steps: int, device: str, samples: int = 8) -> None:
    """Both step spacings against a fine reference, as multiples of the 50-step evenly spaced
    error (the baseline); the same on Gaussian data, where the exact ODE solution is known."""
    g = torch.Generator().manual_seed(0)
    c = net.config
    shape = (c.in_chans, c.img_size, c.img_size)
    cond = {"S2L2A": torch.randn(samples, *shape, generator=g).to(device)}
    noise = {m: torch.randn(samples, *shape, generator=g) for m in ("DEM", "S1RTC")}

    def run(steps: int, spacing: str):
        return generate(net, cond, ["DEM", "S1RTC"], steps=steps, seed=0, initial_noise=noise, spacing=spacing)

    ref = run(ref_steps, "linspace")
    rms = lambda out: float(torch.sqrt(sum(((out[m] - ref[m]) ** 2).mean() for m in ("DEM", "S1RTC")) / 2))
    _report(f"tiny network, vs a {ref_steps}-step solution", lambda n, sp: rms(run(n, sp)))
    _report("Gaussian data, vs the exact ODE solution", _gaussian_error)


def _report(title: str, error) -> None:
    base = error(50, "linspace")
    print(f"[solver] {title} (multiples of the 50-step linspace error {base:.2e}):")
    for spacing in SPACINGS:
        errs = {n: error(n, spacing) for n in (10, 15, 20, 25, 50)}
        line = ", ".join(f"{n}: {e / base:.2f}x" for n, e in errs.items())
        best = min((n for n, e in errs.items() if e <= base * 1.0001), default=None)
        print(f"[solver]   {spacing:8s} {line}; fewest steps at least as accurate: {best}")


def _gaussian_error(steps: int, spacing: str, s: float = 0.6) -> float:
    """RMS error of the solver on data ~ N(0, s^2): the denoiser is exact,
    eps(x, k) = sqrt(1 - abar) x / (abar s^2 + 1 - abar), and so is the ODE solution."""
    abar = alphas_cumprod()
    sched = sampling_scheduler(steps, spacing)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_start = abar[int(sched.timesteps[0])]
    exact = s * x / torch.sqrt(a_start * s * s + 1 - a_start)
    for t in sched.timesteps:
        a = abar[int(t)]
        x = sched.step((1 - a).sqrt() * x / (a * s * s + 1 - a), t, x).prev_sample
    return float(((x - exact) ** 2).mean().sqrt())


def throughput(config: str, device: str, batch: int, steps: int, dtype: torch.dtype, sample: bool = True) -> float:
    """Prints the train steps/s of ``config`` (and, with ``sample``, its sampling tuples/s);
    returns the train steps/s."""
    cfg = load_config(config)
    torch.manual_seed(0)
    net = MultiModalUViT(**cfg.nnet).to(device)
    mods = net.modalities
    c = net.config
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = {m: torch.randn(batch, c.in_chans, c.img_size, c.img_size, device=device) for m in mods}
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def train_step():
        t = draw_timesteps(batch, mods)
        with autocast:
            loss, _ = diffusion_loss(net, x0, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    flops = 3 * model_flops_per_sample(net) * batch / dt
    peak = next((v for k, v in PEAK_FLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    mfu = f", MFU {flops / peak:.1%}" if peak else ""
    print(f"[train] {config} on {device} ({str(dtype).split('.')[-1]}), batch {batch}: {1 / dt:.2f} steps/s, "
          f"{flops / 1e12:.3f} TFLOP/s{mfu}")
    steps_per_s = 1 / dt
    if not sample:
        return steps_per_s
    net.eval()
    cond = {}
    t0 = time.perf_counter()
    n = batch
    generate(net, cond, mods, n_samples=n, steps=cfg.sample.steps, seed=0)
    sync()
    dt = time.perf_counter() - t0
    print(f"[sample] {config} on {device}: {n / dt:.2f} four-modality tuples/s at {cfg.sample.steps} steps "
          f"(batch {n})")
    return steps_per_s


def cpu_bf16_ratio(batch: int, steps: int) -> None:
    """The `small` config's train steps/s in bf16 autocast over fp32 on this CPU."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("[train] this CPU has no native bf16: train --mixed-precision bf16 would be slower here")
        return
    fp32 = throughput("small", "cpu", batch, steps, torch.float32, sample=False)
    bf16 = throughput("small", "cpu", batch, steps, torch.bfloat16, sample=False)
    print(f"[train] small on cpu: bf16 autocast {bf16 / fp32:.2f}x the fp32 steps/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--reference-steps", type=int, default=250)
    ap.add_argument("--quick", action="store_true",
                    help="sweep on 2 samples vs a 60-step reference, 2 train steps at batch 4 (CI)")
    args = ap.parse_args()
    sweep_samples, cpu_batch, gpu_batches = 8, 32, (256, 64)
    if args.quick:
        args.train_steps, args.reference_steps = 2, 60
        sweep_samples, cpu_batch, gpu_batches = 2, 4, (2, 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = MultiModalUViT(**load_config("tiny").nnet).to(device).eval()
    solver_sweep(net, args.reference_steps, device, sweep_samples)
    throughput("tiny", "cpu", cpu_batch, args.train_steps, torch.float32)
    cpu_bf16_ratio(cpu_batch, max(args.train_steps // 2, 2))
    if device == "cuda":
        throughput("paper", "cuda", gpu_batches[0], args.train_steps, torch.bfloat16)
        throughput("release", "cuda", gpu_batches[1], args.train_steps, torch.bfloat16)
    else:
        print("[gpu] no GPU available in this run: paper/release throughput not measured")


if __name__ == "__main__":
    main()
