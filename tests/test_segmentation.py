"""Segmentation: heads' shapes, the metrics on hand-made cases, save/load, and a tiny training run that learns."""

import numpy as np
import pytest
import torch

from vitkit.data.loader import BatchLoader
from vitkit.data.seg_transforms import SegEvalTransform, SegTrainTransform
from vitkit.data.segmentation import IGNORE_INDEX, load_segmentation_source
from vitkit.model.loading import load_model
from vitkit.tasks import SegmentTask, task_of
from vitkit.tasks.segment import (
    SegmentationMetrics,
    SegmentationViT,
    iou_from_confusion,
    pyramid_layers,
    segmentation_loss,
)

from .conftest import tiny_model
from .segmentation_data import SHAPE_CLASSES, write_segmentation_folder


def seg_model(head="linear", depth=2, **kw):
    model = tiny_model(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_classes=3, **kw)
    model.labels = list(SHAPE_CLASSES)
    SegmentTask(head=head).attach(model)
    return model


# ------------------------------------------------------------------------------------------------------ heads


@pytest.mark.parametrize("head", ["linear", "pyramid"])
def test_heads_give_per_pixel_logits_at_the_input_size(head):
    model = seg_model(head, depth=4).eval()
    assert isinstance(model, SegmentationViT)
    assert model.task["head"] == head
    assert model.decoder_layers == ((3,) if head == "linear" else (0, 1, 2, 3))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        grids = model.patch_grids(torch.randn(2, 3, 32, 32))
        raw = model.head(grids)
    assert out.shape == (2, 3, 32, 32)
    assert [g.shape for g in grids] == [(2, 32, 8, 8)] * len(model.decoder_layers)
    assert raw.shape == ((2, 3, 8, 8) if head == "linear" else (2, 3, 16, 16))  # pyramid: twice the grid


def test_pyramid_layers_spread_through_the_depth():
    assert pyramid_layers(12) == (2, 5, 8, 11)
    assert pyramid_layers(9) == (1, 3, 6, 8)
    assert pyramid_layers(2) == (0, 1)  # fewer blocks than levels: each block once


def test_decoder_widths_and_malformed_heads():
    from vitkit.tasks.segment import make_segmenter, pyramid_width

    assert [pyramid_width(d) for d in (32, 100, 192, 384, 768)] == [32, 32, 64, 128, 128]
    model = tiny_model(img_size=32, patch_size=4, embed_dim=32, depth=2, num_classes=3)
    make_segmenter(model, {"name": "segment", "head": "pyramid", "layers": [0, 1], "width": 36})  # 36: 4 groups
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    for bad, message in [
        ({"head": "unet"}, "unknown segmentation head 'unet'"),
        ({"head": "linear", "layers": [5]}, "outside the model's 2 blocks"),
        ({"head": "pyramid", "layers": [0, 1], "width": "wide"}, "malformed segmentation head"),
        ({"head": "pyramid", "layers": [0, 1], "width": 10**9}, "width 1000000000 is outside"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_segmenter(tiny_model(img_size=32, patch_size=4, embed_dim=32, depth=2), {"name": "segment", **bad})


def test_a_head_over_an_avg_pool_encoder_normalises_with_fc_norm():
    model = seg_model(global_pool="avg", class_token=False)  # norm is Identity there, fc_norm the LayerNorm
    assert model.final_norm() is model.fc_norm
    with torch.no_grad():
        grid = model.patch_grids(torch.randn(1, 3, 32, 32))[-1]
    assert torch.allclose(grid.mean(dim=1), torch.zeros(1, 8, 8), atol=1e-4)  # normalised over D per token


# ---------------------------------------------------------------------------------------------------- metrics


def test_iou_on_a_hand_made_confusion():
    conf = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])  # class 2 neither labelled nor predicted
    r = iou_from_confusion(conf)
    assert r["per_class_iou"][:2] == pytest.approx([3 / 4, 4 / 5]) and r["per_class_iou"][2] is None
    assert r["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert r["pixel_acc"] == pytest.approx(7 / 8)
    never_predicted = iou_from_confusion(torch.tensor([[2, 2], [0, 0]]))  # class 1 predicted, never labelled
    assert never_predicted["per_class_iou"] == [0.5, 0.0] and never_predicted["miou"] == 0.25


def test_metrics_ignore_255_and_upsample_logits_to_the_mask():
    masks = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]])  # (1, 4, 4)
    pred = torch.tensor([[0, 0], [2, 1]])  # (2, 2): the upper right quarter wrong, the lower right ignored
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 20  # (1, 3, 2, 2)
    m = SegmentationMetrics(3)
    m.update(logits, masks)
    r = m.result()
    assert r["pixels"] == 12 and r["n"] == 1
    assert r["pixel_acc"] == pytest.approx(8 / 12)
    assert r["per_class_iou"] == pytest.approx([1 / 2, 0.0, 1.0])  # class 0: 4 right, 4 of class 1 taken for it
    assert r["miou"] == pytest.approx(0.5)
    assert r["loss"] == pytest.approx(segmentation_loss(logits, masks).item(), rel=1e-5)


def test_loss_ignores_unlabelled_pixels():
    logits = torch.randn(2, 3, 8, 8)
    masks = torch.full((2, 8, 8), IGNORE_INDEX)
    masks[:, :4] = 1
    full = segmentation_loss(logits, masks)
    assert torch.isclose(full, torch.nn.functional.cross_entropy(logits[:, :, :4], masks[:, :4]))


# ----------------------------------------------------------------------------------------------- save, load


@pytest.mark.parametrize("head", ["linear", "pyramid"])
def test_segmentation_model_saves_and_loads_with_its_head(tmp_path, head):
    model = seg_model(head, depth=4).eval()
    path = model.save(tmp_path / "seg.safetensors")
    loaded = load_model(path)
    assert isinstance(loaded, SegmentationViT) and loaded.task == model.task
    assert loaded.decoder_layers == model.decoder_layers and loaded.labels == list(SHAPE_CLASSES)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    task = task_of(loaded)
    assert isinstance(task, SegmentTask) and task.head == head and task.layers == model.decoder_layers


def test_loading_with_overrides_keeps_the_decoder(tmp_path):
    from vitkit import from_pretrained

    model = seg_model("pyramid", depth=4).eval()
    path = model.save(tmp_path / "seg.safetensors")
    bigger = from_pretrained(path, img_size=48)  # position embedding resampled, decoder kept
    assert isinstance(bigger, SegmentationViT) and bigger.cfg.img_size == (48, 48)
    assert torch.equal(bigger.state_dict()["head.classify.weight"], model.state_dict()["head.classify.weight"])
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 3, 48, 48)
    dynamic = from_pretrained(path, dynamic_img_size=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dynamic(x), model(x))
    other_classes = from_pretrained(path, num_classes=5)  # a fresh decoder of the same kind for 5 classes
    assert isinstance(other_classes, SegmentationViT) and other_classes.task["head"] == "pyramid"
    with torch.no_grad():
        assert other_classes(x).shape == (1, 5, 32, 32)


def test_attach_replaces_a_classifiers_head_and_keeps_its_encoder():
    classifier = tiny_model(img_size=32, patch_size=4, embed_dim=32, depth=2, num_classes=3)
    encoder = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    SegmentTask(head="pyramid").attach(classifier)
    state = classifier.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    assert any(k.startswith("head.fuse.") for k in state) and "head.weight" not in state


# ------------------------------------------------------------------------------------------------- learning


def test_tiny_training_run_segments_shapes_well_above_chance(tmp_path, single_thread):
    """Coloured squares on noise: 200 AdamW steps of a 2-block ViT take mIoU from chance to well above it."""
    root = write_segmentation_folder(tmp_path / "seg", n=96, size=32, seed=1)
    ds = load_segmentation_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    model = seg_model("linear")
    model.preprocess = type(model.preprocess)(input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    train = BatchLoader(ds, np.arange(80), 16, seed=0, transform=SegTrainTransform(model.preprocess, scale=(0.75, 1.5)))
    val = BatchLoader(
        ds, np.arange(80, 96), 16, shuffle=False, drop_last=False, transform=SegEvalTransform(model.preprocess)
    )

    def miou() -> float:
        m = SegmentationMetrics(3)
        model.eval()
        with torch.no_grad():
            for x, y in val:
                m.update(model(x), y)
        model.train()
        return m.result()["miou"]

    before = miou()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(40):  # 5 batches an epoch: 200 steps
        for x, y in train:
            loss = segmentation_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = miou()
    assert before < 0.4  # untrained: near chance (background everywhere gives about 1/3)
    assert after > 0.7, (before, after)
