"""Frozen-feature judges: the cosine k-NN vote (temperature-weighted, as DINO's), the linear probe, `frozen_eval`
on a labelled source, the every-N-epochs hook for training loops, and `vitkit evaluate --knn --probe --json`."""

import json

import numpy as np
import pytest
import torch

from vitkit.data.sources import load_source
from vitkit.infer.frozen import (
    FrozenEvalEvery,
    frozen_eval,
    knn_accuracy,
    knn_predict,
    probe_accuracy,
    split_bank_queries,
)

from .conftest import run_vitkit, tiny_model


def test_k1_is_the_nearest_neighbour_by_cosine():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    bank_labels = torch.randint(0, 5, (60,), generator=g)
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    nearest = bank_labels[sims.argmax(dim=1)]
    assert torch.equal(knn_predict(bank, bank_labels, queries, 5, k=1).argmax(dim=1), nearest)
    assert knn_accuracy(bank, bank_labels, queries, nearest, k=1) == 1.0
    # the scale of a feature vector does not matter, only its direction
    assert torch.equal(knn_predict(bank * 7, bank_labels, queries * 0.1, 5, k=1).argmax(dim=1), nearest)


def test_a_close_neighbour_outvotes_two_farther_ones():
    # query (1, 0): class 0 at similarity 1, two class-1 rows at similarity 0.8. A plain majority of k=3 says 1;
    # weights exp(sim / 0.07) say 0 (e^(1/0.07) > 2 e^(0.8/0.07)).
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    scores = knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), 2, k=3)
    assert scores.argmax().item() == 0
    assert knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=10).argmax() == 1


def test_probe_separates_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 50 + 1000  # far from the origin: standardising matters
    labels = torch.arange(200) % 4
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    assert probe_accuracy(feats[:150], labels[:150], feats[150:], labels[150:]) == 1.0
    noise = torch.randn(200, 16, generator=g)
    assert probe_accuracy(noise[:150], labels[:150], noise[150:], labels[150:]) < 0.6


@pytest.fixture(scope="module")
def digits_model():
    """An untrained digits ViT: an encoder with no class names, as pretraining leaves one."""
    return tiny_model("vit_digits_patch2_8", img_size=8, patch_size=2, in_chans=1, num_classes=10, num_heads=2)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """A digits ViT trained for 8 epochs (~10 s; about 65 % top-1 on its held-out 10 %)."""
    import vitkit
    from vitkit.train import fit

    from .conftest import tiny_digits_config

    res = fit(tiny_digits_config(tmp_path_factory.mktemp("digits_run"), epochs=8, lr=3e-3))
    return vitkit.from_pretrained(res.model_path)


def test_frozen_eval_ranks_a_trained_encoder_above_an_untrained_one(digits_model, trained_digits):
    ds = load_source("digits", progress=False)
    digits_model.train()
    untrained = frozen_eval(digits_model, ds, probe=True)
    assert digits_model.training  # left in the mode it came in
    bank, queries = split_bank_queries(ds.labels, 0.1, 0)
    assert (untrained.bank, untrained.queries) == (len(bank), len(queries)) and untrained.k == 20
    trained = frozen_eval(trained_digits, ds, probe=True)
    assert trained.knn_top1 > untrained.knn_top1 + 0.2
    assert trained.probe_top1 > untrained.probe_top1 + 0.2
    assert frozen_eval(digits_model, ds).probe_top1 is None


def test_every_n_epochs(digits_model):
    hook = FrozenEvalEvery("digits", every=2)
    results = [hook(digits_model, epoch) for epoch in range(1, 5)]
    assert [r is not None for r in results] == [False, True, False, True]
    assert results[1]["knn_top1"] == results[3]["knn_top1"]  # same weights, same split: same number
    assert all(r is None for r in map(lambda e: FrozenEvalEvery("digits", every=0)(digits_model, e), (1, 2)))


def test_cli_knn_and_probe_json(tmp_path, digits_model):
    ckpt = digits_model.save(tmp_path / "encoder.safetensors")  # no class names: an encoder, not a classifier
    r = run_vitkit(["evaluate", str(ckpt), "--data", "digits", "--knn", "--probe", "--k", "10", "--json"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["k"] == 10 and result["bank"] + result["queries"] == 1797
    # untrained features still carry the digits: twice chance (10 %) and more
    assert 0.2 < result["knn_top1"] <= 1 and 0.2 < result["probe_top1"] <= 1
    assert np.isclose(result["queries"] / 1797, 0.1, atol=0.01)


def test_pretraining_logs_knn_every_n_epochs_and_trains_the_same(tmp_path, single_thread):
    from vitkit.pretrain import pretrain
    from vitkit.train.checkpoint import load_checkpoint
    from vitkit.train.logging import read_metrics

    from .test_pretrain import tiny_pretrain_config

    with_knn = pretrain(tiny_pretrain_config(tmp_path / "knn", epochs=2, knn_every=1))
    records = [r for r in read_metrics(with_knn.out_dir) if r["kind"] == "knn"]
    assert [r["final"] for r in records] == [False, True]  # epoch 1, then the end of the run (1.95 epochs)
    assert records[0]["epoch"] == 1
    assert all(0.1 < r["knn_top1"] <= 1 and r["k"] == 20 for r in records)
    # the k-NN reads the encoder and draws no random number: the run trains exactly as without it
    without = pretrain(tiny_pretrain_config(tmp_path / "plain", epochs=2))
    a, b = load_checkpoint(with_knn.checkpoint_path), load_checkpoint(without.checkpoint_path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_knn_every_on_unlabelled_images_asks_for_knn_data(tmp_path):
    from vitkit.pretrain import pretrain

    from .conftest import noise_rgb, write_png
    from .test_pretrain import tiny_pretrain_config

    folder = tmp_path / "flat"  # images with no class folders: pretraining data, but nothing for a k-NN to score
    folder.mkdir()
    for i in range(8):
        write_png(folder / f"{i}.png", noise_rgb(16, 16, seed=i))
    with pytest.raises(ValueError, match="--knn-data"):
        pretrain(tiny_pretrain_config(tmp_path / "run", data=str(folder), knn_every=1))
