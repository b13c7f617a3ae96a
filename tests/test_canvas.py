"""Issue #15: a cell generated on one latent canvas of overlapping windows, decoded whole,
and the seam metric that shows the difference."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.canvas import Canvas, window_starts, window_weight
from model.metrics import seam_ratio
from model.sample import generate
from pipelines.cell_canvas import canvas_groups, tile, untile
from pipelines.sample import SamplingOptions, sample_store

from conftest import WORLD_CELLS, tiny_model


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("length,window,stride", [(128, 32, 24), (128, 32, 16), (100, 32, 30), (32, 32, 8), (40, 32, 32)])
def test_window_starts__cover_the_canvas_at_most_stride_apart(length, window, stride):
    starts = window_starts(length, window, stride)
    assert starts[0] == 0 and starts[-1] == length - window
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()


def test_window_starts__refuse_gaps_and_small_canvases():
    with pytest.raises(ValueError, match="gaps"):
        window_starts(128, 32, 33)
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(16, 32, 8)


def test_canvas__merge_of_crops_is_the_canvas_and_windows_weigh_most_at_their_centre():
    x = torch.randn(3, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    canvas = Canvas(40, 56, 16, 12)
    windows = canvas.crop(x)
    assert windows.shape == (3 * canvas.n_windows, 4, 16, 16)
    r, c = canvas.starts[4]
    assert torch.equal(windows[4], x[0, :, r:r + 16, c:c + 16]) and torch.equal(windows[canvas.n_windows], x[1, :, :16, :16])
    assert torch.allclose(canvas.merge(windows), x, atol=1e-6)
    assert torch.allclose(canvas.merge(torch.tanh(windows)), torch.tanh(x), atol=1e-6)  # any pixel-wise map commutes
    w = window_weight(16)
    assert w.min() > 0 and w[7, 7] == w.max() and w[0, 0] == w.min()


class _Pixelwise(torch.nn.Module):
    """A stand-in network whose output at a pixel depends only on the inputs at that pixel and
    the timesteps: for it, denoising a canvas window by window and merging must equal
    denoising the whole canvas in one call."""

    def __init__(self, img_size: int):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.tensor([0.6, -0.3, 0.2]))
        self.config = SimpleNamespace(modalities=["A", "B", "C"], img_size=img_size, in_chans=4, prediction="epsilon")
        self.modalities = self.config.modalities

    def forward(self, lat, ts):
        def t(m):
            return (ts[m].float() / 1000).view(-1, 1, 1, 1)
        a, b, c = (lat[m] for m in self.modalities)
        shared = self.mix[0] * a + self.mix[1] * torch.sin(b) + self.mix[2] * c * t("B")
        return {m: torch.tanh(shared + lat[m] * (1 - t(m))) for m in self.modalities}


def test_generate__a_canvas_of_windows_equals_the_whole_canvas_for_a_pixelwise_network():
    g = torch.Generator().manual_seed(3)
    cond = {"A": torch.randn(2, 4, 24, 40, generator=g)}
    noise = {m: torch.randn(2, 4, 24, 40, generator=g) for m in "BC"}
    kwargs = dict(steps=4, initial_noise={"B": noise["B"]}, marginal_noise={"C": noise["C"]})
    whole = generate(_Pixelwise(img_size=24), cond, ["B"], **kwargs)["B"]  # 24 x 40 is not square: windows of 24
    windows = generate(_Pixelwise(img_size=8), cond, ["B"], stride=5, **kwargs)["B"]
    assert windows.shape == (2, 4, 24, 40)
    assert torch.allclose(windows, whole, atol=1e-5)
    assert not torch.allclose(windows, noise["B"], atol=1e-2)  # it did denoise


# ----------------------------------------------------------------------------- cells as canvases
def test_tile__fragment_index_row_col_lands_in_its_place_and_untile_inverts():
    frags = torch.arange(2 * 16, dtype=torch.float32).view(32, 1, 1, 1).expand(32, 2, 3, 5).clone()
    canvas = tile(frags)
    assert canvas.shape == (2, 2, 12, 20)
    assert canvas[0, 0, 3, 5] == 5 and canvas[0, 0, 11, 19] == 15 and canvas[1, 1, 6, 0] == 16 + 8  # index = row*4 + col
    assert torch.equal(untile(canvas), frags)


def test_canvas_groups__only_complete_cells_and_samples_form_canvases():
    cells = ["a"] * 16 + ["b"] * 15 + ["c"] * 17
    frags = list(range(16))[::-1] + list(range(15)) + list(range(16)) + [3]  # c repeats a fragment
    groups, rest = canvas_groups(cells, frags)
    assert groups == [list(range(16))[::-1]]  # rows of cell a, in fragment order
    assert rest == list(range(16, 48))
    groups, _ = canvas_groups(["a"] * 32, list(range(16)) * 2, samples=[0] * 16 + [1] * 16)
    assert groups == [list(range(16)), list(range(16, 32))]


def test_seam_ratio__about_one_for_a_smooth_field_large_for_a_patchwork_and_the_tone_seam_sees_ramps():
    from scipy.ndimage import uniform_filter

    yy, xx = np.mgrid[0:512, 0:768] / 80.0
    smooth = (np.sin(xx) + np.cos(1.3 * yy) + 0.5 * np.sin(xx + yy))[None] * 60 + 128
    assert 0.95 < seam_ratio(smooth) < 1.05 and 0.9 < seam_ratio(smooth, width=8) < 1.2
    patchwork = smooth.copy()
    rng = np.random.default_rng(0)
    for r in range(0, 512, 256):
        for c in range(0, 768, 256):
            patchwork[:, r:r + 256, c:c + 256] += rng.normal(0, 20)
    assert seam_ratio(patchwork) > 5 and seam_ratio(patchwork, width=8) > 2
    ramps = uniform_filter(patchwork, size=(1, 16, 16))  # each step smoothed over 16 px, as a decoder may
    assert seam_ratio(ramps) < 1.05  # invisible to the pixel seam ...
    assert seam_ratio(ramps, width=8) > 1.5  # ... not to the tone seam
    with pytest.raises(ValueError, match="larger than one"):
        seam_ratio(np.zeros((1, 256, 256)))


def test_sample_store__seamless_cells_are_one_canvas_independent_of_the_other_cells(store, tmp_path):
    """Whole cells are sampled as canvases (not as the independent fragments), a cell's result
    is the same sampled alone or with others, in any chunking, and the decoded quick-look and
    the fragments agree with the latents."""
    model = tiny_model(tmp_path / "model")
    kwargs = dict(condition=("S2L1C",), generate_modalities=("DEM",))
    options = SamplingOptions(steps=2, n_samples=2, seed=5, device="cpu", batch_size=16)
    both = np.load(sample_store(model, store, list(WORLD_CELLS[:2]), out=tmp_path / "both", options=options,
                                **kwargs).out / "samples.npz")
    alone = np.load(sample_store(model, store, [WORLD_CELLS[1]], out=tmp_path / "alone",
                                 options=replace(options, batch_size=64), **kwargs).out / "samples.npz")
    fragments = np.load(sample_store(model, store, [WORLD_CELLS[1]], out=tmp_path / "fragments",
                                     options=replace(options, seamless=False), **kwargs).out / "samples.npz")
    second = both["grid_cell"] == WORLD_CELLS[1]
    assert second.sum() == 32  # 16 fragments x 2 samples
    assert np.array_equal(both["latent_DEM"][second], alone["latent_DEM"])
    assert np.array_equal(both["fragment_index"][second], alone["fragment_index"])
    assert not np.allclose(alone["latent_DEM"], fragments["latent_DEM"], atol=1e-2)
    assert np.array_equal(alone["latent_S2L1C"], fragments["latent_S2L1C"])  # the same condition draws


def test_decode_fragments__whole_cells_decode_as_a_canvas_in_place(store):
    """patch-pca decodes each 8 px block on its own, so a cell decoded as one canvas must equal
    its fragments decoded one by one: this pins every fragment to its place in the canvas."""
    from majortom_gen.store import LatentStore, moment_array
    from model.codecs import moment_means
    from pipelines.codec import decode_fragments, decode_images, require_store_codec

    table = LatentStore.open(store).table(["grid_cell", "fragment_index", "DEM"], cells=[WORLD_CELLS[0]])
    latents = moment_means(torch.from_numpy(moment_array(table, "DEM", np.float32)))
    codec = require_store_codec(store)
    order = np.random.default_rng(0).permutation(len(latents))  # rows in any order
    cells, frags = table.column("grid_cell").to_pylist(), table.column("fragment_index").to_pylist()
    whole = decode_fragments(codec, latents[order], None, [cells[i] for i in order], [frags[i] for i in order])
    one_by_one = decode_images(codec, latents[order])
    assert len(set(frags)) == 16 and np.array_equal(whole, one_by_one)
