"""Retrieval: `vitkit index` / `vitkit search` / `evaluate --retrieval`, exact chunked top-k, the model fingerprint
that refuses queries from another model, the index files' integrity, and `vitkit embed` skipping bad images."""

import json
import sys

import numpy as np
import pytest
import torch

from vitkit.cli import main
from vitkit.infer.retrieval import (
    IndexFiles,
    RetrievalIndex,
    build_index,
    exact_topk,
    model_fingerprint,
    recall_at_k,
)

from .conftest import make_image_folder, noise_rgb, tiny_model, write_png

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A folder of class folders (3 colours x 6 images, 32x32) with one broken file, and a tiny model's checkpoint."""
    root = tmp_path_factory.mktemp("retrieval")
    make_image_folder(root / "gallery", LABELS, per_class=6, size=32)
    (root / "gallery" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ckpt = tiny_model("vit_small_patch16_224", labels=LABELS, num_classes=3).save(root / "model.safetensors")
    other = tiny_model("vit_small_patch16_224", seed=1, labels=LABELS, num_classes=3).save(root / "other.safetensors")
    return root, ckpt, other


def test_exact_topk_in_chunks_equals_one_matmul():
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    want_s, want_i = (queries @ gallery.T).topk(5, dim=1)
    s, i = exact_topk(queries, gallery, 5, query_chunk=3, gallery_chunk=4)  # chunk sizes that divide nothing
    assert torch.equal(i, want_i) and torch.allclose(s, want_s)
    s, i = exact_topk(queries, gallery, 50)  # k beyond the gallery: every row, best first
    assert i.shape == (7, 23) and torch.equal(i[:, :5], want_i)


def test_recall_at_k_counts_a_query_once_its_label_appears():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    gallery_labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.9]])  # nearest: row 0 (label 0); then rows 2, 0, 1
    recall = recall_at_k(queries, torch.tensor([0, 1]), gallery, gallery_labels, ks=(1, 2, 3))
    assert recall == {1: 0.5, 2: 0.5, 3: 1.0}


def test_fingerprint_follows_the_encoder_not_the_head():
    a, b = tiny_model(), tiny_model()
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.weight.add_(1.0)  # pooled features never pass through the head
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.blocks[0].mlp.fc1.bias.add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_ignores_training_only_patch_dropout():
    a, b = tiny_model(), tiny_model()
    b.cfg.patch_drop_rate = 0.5  # acts in training only: the pooled features in eval are the same
    assert model_fingerprint(a) == model_fingerprint(b)
    b.cfg.depth = a.cfg.depth + 1  # any other field still counts
    assert model_fingerprint(a) != model_fingerprint(b)


def test_index_and_search_cli(gallery, tmp_path, capsys):
    root, ckpt, _ = gallery
    out = tmp_path / "idx"
    assert main(["index", str(ckpt), str(root / "gallery"), "-o", str(out)]) == 1  # the broken file is left out
    o, err = capsys.readouterr()
    assert "broken.png" in err and "18 images" in o and "3 classes" in o
    files = IndexFiles.of(out)
    meta = json.loads(files.sidecar.read_text())
    assert meta["count"] == 18 and meta["classes"] == sorted(LABELS) and "broken.png" in meta["skipped"][0][0]
    assert not files.graph.exists()  # 18 vectors: exact search, no faiss graph

    query = str(root / "gallery" / "blue" / "003.png")  # an image of the gallery finds itself first
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff")
    rc = main(["search", str(files.tensors), query, str(bad), "--topk", "3", "--json"])
    o, err = capsys.readouterr()
    assert rc == 1 and "bad.jpg" in err
    rows = [json.loads(line) for line in o.splitlines()]
    assert rows[1] == {"image": str(bad), "error": rows[1]["error"]} and "bad.jpg" in rows[1]["error"]
    top = rows[0]["matches"]
    assert [m["rank"] for m in top] == [1, 2, 3]
    assert top[0]["name"] == query and top[0]["score"] == pytest.approx(1.0, abs=1e-3) and top[0]["label"] == "blue"
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]

    assert main(["search", str(out), query, "--topk", "2"]) == 0  # text output, index named without a suffix
    o = capsys.readouterr().out
    assert o.splitlines()[0] == f"{query}:" and "1. " + query + " [blue]" in o


def test_search_refuses_queries_from_another_model(gallery, tmp_path, capsys):
    root, ckpt, other = gallery
    out = tmp_path / "idx"
    index, _ = build_index(ckpt, [str(root / "gallery" / "green")])
    index.save(out)
    rc = main(["search", str(out), str(root / "gallery" / "green" / "000.png"), "--checkpoint", str(other)])
    assert rc == 1 and "different model" in capsys.readouterr().err
    loaded = RetrievalIndex.load(out)
    assert loaded.labels is None  # one flat folder: no class layout, no labels
    with pytest.raises(ValueError, match="different model"):
        loaded.search(np.ones((1, loaded.vectors.shape[1]), np.float32), fingerprint="0" * 32)


def test_a_sidecar_from_another_write_is_refused(gallery, tmp_path):
    root, ckpt, _ = gallery
    index, _ = build_index(ckpt, [str(root / "gallery" / "red" / "000.png"), str(root / "gallery" / "red" / "001.png")])
    first = IndexFiles.of(index.save(tmp_path / "a").tensors)
    kept = first.sidecar.read_bytes()
    index.save(tmp_path / "a")  # a second write: new id in both files
    first.sidecar.write_bytes(kept)  # as if the second write died before its sidecar
    with pytest.raises(ValueError, match="different writes"):
        RetrievalIndex.load(tmp_path / "a")


def test_a_dataset_source_indexes_with_labels(gallery, tmp_path):
    root, ckpt, _ = gallery
    rows = [f"{p.as_posix()},{p.parent.name}" for p in sorted((root / "gallery").rglob("*.png"))]
    csv = tmp_path / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    index, failures = build_index(ckpt, [str(csv)], cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(index) == 18 and len(failures) == 1 and "broken.png" in failures[0].error
    assert sorted(index.classes) == sorted(LABELS) and index.labels is not None and len(index.labels) == 18
    assert index.names[0] == f"{csv}[0]"


def test_evaluate_retrieval_split_and_gallery(gallery, tmp_path, capsys):
    root, ckpt, _ = gallery
    data = make_image_folder(tmp_path / "queries", LABELS, per_class=4, size=32, seed=5)
    cache = str(tmp_path / "cache")
    common = ["--cache-dir", cache, "--json", "--precision", "fp32"]
    assert (
        main(["evaluate", str(ckpt), "--data", str(data), "--retrieval", "--gallery", str(root / "gallery")] + common)
        == 0
    )
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["queries"] == 12 and report["gallery"] == 18
    assert report["recall@1"] >= 0.9 and report["recall@5"] >= report["recall@1"]  # colours separate even untrained
    assert (
        main(["evaluate", str(ckpt), "--data", str(root / "gallery"), "--retrieval", "--val-split", "0.5"] + common)
        == 0
    )
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["queries"] == 9 and report["gallery"] == 9  # the held-out half searches the rest


def test_embed_skips_and_names_a_bad_image(gallery, tmp_path, capsys):
    root, ckpt, _ = gallery
    good = write_png(tmp_path / "good.png", noise_rgb(32, 32))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "feats.npy"
    assert main(["embed", str(ckpt), good, str(bad), "-o", str(out)]) == 1
    assert "bad.png" in capsys.readouterr().err
    assert np.load(out).shape == (1, 32)
    assert (tmp_path / "feats.txt").read_text() == f"{good}\n"


def test_faiss_engine_missing_says_what_to_install(gallery, tmp_path, monkeypatch):
    root, ckpt, _ = gallery
    index, _ = build_index(ckpt, [str(root / "gallery" / "blue")])
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails, installed or not
    with pytest.raises(ImportError, match=r"faiss-cpu.*vitkit\[retrieval\]"):
        index.search(index.vectors[:1].numpy(), index.fingerprint, engine="faiss")
    assert len(index.search(index.vectors[:1].numpy(), index.fingerprint, engine="auto")[0]) == 5  # exact
    with pytest.raises(ImportError, match="faiss"):
        index.save(tmp_path / "idx", engine="faiss")
    assert not list(tmp_path.iterdir())  # refused before any file was written


def test_faiss_engine_agrees_with_exact_search(gallery, tmp_path):
    pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install 'vitkit[retrieval]'")
    root, ckpt, _ = gallery
    index, _ = build_index(ckpt, [str(root / "gallery")])
    files = index.save(tmp_path / "idx", engine="faiss")
    assert files.graph.is_file()
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert loaded.graph is not None
    queries = index.vectors[::5].numpy()
    exact = loaded.search(queries, index.fingerprint, topk=3, engine="exact")
    approx = loaded.search(queries, index.fingerprint, topk=3, engine="faiss")
    assert [[m.index for m in row] for row in approx] == [[m.index for m in row] for row in exact]
    assert approx[0][0].score == pytest.approx(exact[0][0].score, abs=1e-4)


def test_auto_engine_takes_faiss_for_a_large_index(gallery, tmp_path, monkeypatch, capsys):
    pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install 'vitkit[retrieval]'")
    from vitkit.infer import retrieval

    root, ckpt, _ = gallery
    monkeypatch.setattr(retrieval, "FAISS_MIN_VECTORS", 10)  # 18 images count as a large index now
    assert (
        main(
            [
                "index",
                str(ckpt),
                str(root / "gallery" / "green"),
                str(root / "gallery" / "blue"),
                "-o",
                str(tmp_path / "i"),
            ]
        )
        == 0
    )
    assert IndexFiles.of(tmp_path / "i").graph.is_file() and "i.faiss" in capsys.readouterr().out
    query = str(root / "gallery" / "green" / "002.png")
    for engine in ("auto", "exact"):
        assert main(["search", str(tmp_path / "i"), query, "--json", "--engine", engine]) == 0
        assert json.loads(capsys.readouterr().out)["matches"][0]["name"] == query
    monkeypatch.setattr(retrieval, "FAISS_MIN_VECTORS", 100)
    assert main(["index", str(ckpt), str(root / "gallery" / "green"), "-o", str(tmp_path / "i")]) == 0
    assert not IndexFiles.of(tmp_path / "i").graph.exists()  # the old graph would not match the new vectors
