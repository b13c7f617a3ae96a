"""Classifier-free guidance defaults of every sampling command (torch-free: the CLI reads them).

Guidance (``model.sample.generate(guidance=...)``) pushes each noise prediction away from the
prediction without the conditions (all dropped together: ``e_unc + (1 + w)(e_c - e_unc)``, one
more network call per guided step), and only on the steps whose noise
level sigma is at least :data:`GUIDANCE_MIN_SIGMA` (a guidance interval, Kynkaanniemi et al.
2024): that is where the conditions decide what goes where.

Measured with the shipped demo model on 48 fragments of 3 demo cells it never saw (500U_58R-60R),
DEM and S1RTC generated from S2L2A, 25 steps, paired MAE against unconditional samples:
no guidance -10% / -18% (DEM / S1RTC); w = 1: -24% / -23%; w = 2: -27% / -23%; w = 3:
-29% / -21%; w = 2 from sigma 3: -27% / -25%; w = 4 from sigma 3: -30% / -22%. 50 steps
instead of 25 change nothing. Guidance also makes the samples rougher (mean absolute gradient
over the real: DEM 1.54 without, 1.7-1.9 with). On the demo's two held-out cells (its
fine-tuned model, `evaluation/table1.md`), S2L2A / S2L1C+S2L2A cut the S1RTC MAE by 17% / 17%
without guidance, 26% / 27% with w = 1 from sigma 3 (gradient ratio 1.05 -> 1.51) and 24% / 25%
with w = 3 (gradient ratio 1.93): w = 1 is the default. DEM barely moves there (-1% / -3%; see
benchmarks/bench_learnability.py for why).
"""

GUIDANCE_DEFAULT = 1.0  # weight w
GUIDANCE_MIN_SIGMA = 3.0  # noise over signal; 25 Karras steps guide their 9 noisiest (sigma 14.6 .. 3.2)
