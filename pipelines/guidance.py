"""Classifier-free guidance defaults of every sampling command (torch-free: the CLI reads them).

Guidance (``model.sample.generate(guidance=...)``) pushes each noise prediction away from the
prediction without the conditions (all dropped together: ``e_unc + (1 + w)(e_c - e_unc)``, one
more network call per guided step), and only on the steps whose noise
level sigma is at least :data:`GUIDANCE_MIN_SIGMA` (a guidance interval, Kynkaanniemi et al.
2024): that is where the conditions decide what goes where.

Guidance is off by default (w = 0): the shipped demo model is trained on the zero-terminal-SNR
schedule (README, "What the demo model can and cannot do"), where the conditions already decide
the layout from the first step, and guidance only made its samples rougher. Measured with it
(stage 9, the last stage but one) on the demo's two held-out cells, 25 steps, seed 0, paired MAE against unconditional
samples of the same fragments (gradient ratio: roughness over the real images'): S2L2A -> DEM
-33% at 1.75x without guidance, -25% at 1.94x with w = 1 from sigma 3; S2L2A -> S1RTC -41% at
1.28x without, -46% at 1.64x with. `--guidance 1` remains for models trained on the released
schedule, whose first steps hardly use the conditions: an earlier demo model (released schedule)
cut the S1RTC MAE by 17% without guidance and 26% with w = 1 from sigma 3 (gradient ratio
1.05 -> 1.51); w = 3 did no better (24%, 1.93x); 50 steps instead of 25 changed nothing.
"""

GUIDANCE_DEFAULT = 0.0  # weight w (0: none)
GUIDANCE_MIN_SIGMA = 3.0  # noise over signal; 25 Karras steps guide their 9 noisiest (sigma 14.6 .. 3.2)
