"""Feature extractors: the FID Inception layout, loading from local files, DINOv2 through
transformers' save_pretrained/from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.features import FIDInceptionV3, load_extractor, save_random_extractors


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    return save_random_extractors(tmp_path_factory.mktemp("extractors"), seed=1)


def test_inception_has_the_pt_inception_layout():
    """The key names and shapes of torchvision's Inception3 (no aux head, 1008 classes), which
    the pt_inception-2015-12-05 file uses: 23,850,960 parameters."""
    state = FIDInceptionV3().state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    assert state["Mixed_5b.branch5x5_2.conv.weight"].shape == (64, 48, 5, 5)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7a.branch7x7x3_4.conv.weight"].shape == (192, 192, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 23_850_960
    assert not any(k.startswith("AuxLogits") for k in state)


def test_inception_round_trip_and_features(extractors, tmp_path):
    ex = load_extractor("inception", extractors["inception"], device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    f = ex(images)
    assert f.shape == (3, 2048) and np.isfinite(f).all() and f.std() > 0
    assert np.array_equal(ex(images), f)  # deterministic (eval mode)
    again = load_extractor("inception", extractors["inception"], device="cpu")
    assert again.fingerprint == ex.fingerprint and np.allclose(again(images), f)
    # a grey (N, H, W) stack is repeated to RGB
    assert np.allclose(ex(images[..., 0]), ex(np.repeat(images[..., :1], 3, axis=-1)))
    # a state dict of another network is refused, naming what is missing
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        load_extractor("inception", tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="no Inception state-dict file"):
        load_extractor("inception", tmp_path / "missing.pth")
    # the published file carries no num_batches_tracked buffers; it still loads
    state = {k: v for k, v in torch.load(extractors["inception"]).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "ported.pth")
    assert np.allclose(load_extractor("inception", tmp_path / "ported.pth", device="cpu")(images), f)


def test_dinov2_from_a_saved_folder(extractors):
    ex = load_extractor("dinov2", extractors["dinov2"], device="cpu")
    images = np.random.default_rng(1).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    f = ex(images, batch_size=3)
    assert f.shape == (4, 64) and np.isfinite(f).all()
    assert np.allclose(ex(images[1:2]), f[1:2], atol=1e-5)  # batching does not change features
    assert ex.fingerprint != load_extractor("inception", extractors["inception"], device="cpu").fingerprint
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_extractor("clip", extractors["dinov2"])
