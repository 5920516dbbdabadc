"""`vitkit explain --keep-mass`: each head's map becomes the smallest patch set holding the asked share of its
attention (DINO's visualisation), one mask per head, drawn into the PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.infer.attention_maps import keep_mass_mask
from vitkit.infer.explain import Explainer
from vitkit.infer.predict import Predictor

from .conftest import noise_rgb, tiny_kwargs, write_png


def random_maps(shape=(3, 4, 6, 5), seed=0) -> torch.Tensor:
    """Peaked random maps (..., h, w), each summing to 1."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(*shape[:-2], shape[-2] * shape[-1], generator=g).mul(2).softmax(-1)
    return flat.view(shape)


@pytest.mark.parametrize("mass", [0.1, 0.6, 0.9])
def test_the_kept_set_holds_the_mass_and_is_the_smallest(mass):
    heat = random_maps()
    mask = keep_mass_mask(heat, mass)
    assert mask.shape == heat.shape and mask.dtype == torch.bool
    for m, h in zip(mask.flatten(0, 1), heat.flatten(0, 1)):  # every (image, head) map
        kept = h[m]
        assert kept.sum() >= mass - 1e-6
        assert kept.sum() - kept.min() < mass - 1e-6  # without its lightest patch the set falls short
        assert kept.min() >= h[~m].max()  # the heaviest patches, not any set of that size


def test_a_uniform_map_keeps_its_share_of_patches():
    heat = torch.full((4, 5), 1 / 20)
    assert int(keep_mass_mask(heat, 0.6).sum()) == 12
    assert bool(keep_mass_mask(heat, 1.0).all())


def test_a_mass_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        keep_mass_mask(random_maps(), 0.0)
    p = Predictor(vitkit.create_model("vit_small_patch16_224", **tiny_kwargs()))
    with pytest.raises(ValueError, match="--keep-mass"):
        Explainer(p, keep_mass=1.5)


def test_explainer_gives_one_mask_per_head():
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs())
    (ex,) = Explainer(Predictor(model), head="all", keep_mass=0.6).explain([noise_rgb()])
    assert ex.heat.shape == ex.mask.shape == (4, 4, 4)  # (heads, 32/8, 32/8)
    held = (ex.heat * ex.mask).sum(axis=(1, 2))
    assert (held >= 0.6 - 1e-5).all()
    assert "60% of the attention" in ex.description


def test_cli_keep_mass_draws_a_panel_per_head(tmp_path, capsys):
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs())
    model.labels = ["cat", "dog", "car", "ship", "frog"]
    ckpt = model.save(tmp_path / "m.safetensors")
    image = write_png(tmp_path / "photo.png", noise_rgb(64, 64))
    plain, masked = tmp_path / "plain.png", tmp_path / "masked.png"
    assert main(["explain", str(ckpt), image, "-o", str(plain)]) == 0
    assert main(["explain", str(ckpt), image, "--keep-mass", "0.6", "-o", str(masked)]) == 0
    assert "smallest patch set holding 60%" in capsys.readouterr().out
    fig = Image.open(masked)
    assert fig.format == "PNG"
    # the input panel plus one per head (4) against input plus one heatmap: a wider figure
    assert fig.size[0] > 2 * Image.open(plain).size[0]
    pixels = np.asarray(fig.convert("RGB"))
    assert pixels.std() > 10  # drawn, not blank
