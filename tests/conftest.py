"""Shared fixtures: a small synthetic Major TOM world made by the project itself."""

from __future__ import annotations

import pytest

from majortom_gen.synth import SynthOptions, write_world
from majortom_gen.synth.world import QUIRKS

# Three adjacent cells near Turin (UTM 32N), and one south of the equator.
WORLD_CELLS = ("501U_59R", "501U_60R", "502U_60R")


def tiny_model(folder):
    """A random-weight 4-modality U-ViT (32 latents, patch 8, width 32, depth 2) saved to ``folder``."""
    import torch

    from model.uvit import MultiModalUViT

    torch.manual_seed(0)
    MultiModalUViT(modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"), img_size=32, in_chans=4, patch_size=8, embed_dim=32,
                   depth=2, num_heads=4).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A 3-cell world with every quirk on, two products per shard (so there are 2 shards)."""
    root = tmp_path_factory.mktemp("world")
    write_world(WORLD_CELLS, root, SynthOptions(seed=7, products_per_shard=2, quirks=QUIRKS, workers=1))
    return root


@pytest.fixture(scope="session")
def store(world, tmp_path_factory):
    """The world's three cells ingested into a latent store with the fast patch-pca codec (the
    learned default is covered by test_codecs, test_learning and the demo test), shared by the model,
    dataset and evaluation tests (they only read it, or add keyed caches)."""
    from pipelines.ingest import IngestOptions, ingest

    root = tmp_path_factory.mktemp("store") / "store"
    ingest(world, list(WORLD_CELLS), root, IngestOptions(scheduler="synchronous", codec="patch-pca"))
    return root
