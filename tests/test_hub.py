"""Loading by name through the Hugging Face Hub, against the Hub stand-in of tests/hub_server.py (no internet).

The repos are written by timm's and transformers' own save functions (tiny random models), served on 127.0.0.1
and reached through HF_ENDPOINT. Covered: the names accepted, download and parity (fp32, max |logit diff| <=
1e-4), safetensors before pickle, provenance in the load report, the cache without the server, HF_HUB_OFFLINE
and local_files_only, revisions, private and gated repos, truncated, corrupted and late downloads, and the CLI.
"""

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from tests.hub_server import TOKEN, read_folder
from vitkit.interop import load_with_report
from vitkit.interop.hub import ArchitectureName, HubName, choose_files, default_weights, names_weights, parse_name
from vitkit.model.serialization import CheckpointError, read_metadata

timm = pytest.importorskip("timm")
TOL = 1e-4
TIMM_REPO = "timm/vit_tiny_patch16_224.vitkit_test"  # what the tagged timm name below resolves to
TIMM_NAME = "vit_tiny_patch16_224.vitkit_test"
HF_REPO = "google-test/vit-tiny"
LABELS = ["ant", "bee", "cow"]
TAGGED = "vit_small_patch16_224.augreg_in21k_ft_in1k"


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (LayerNorm weights around 1) so that any mis-mapped tensor changes the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith("weight")) else noise * 2)
    return model.eval()


def timm_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    return randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw))


def save_timm(model: torch.nn.Module, folder: Path) -> Path:
    """timm's Hub layout, with both weights files (as timm pushes them) so the choice between them shows."""
    from timm.models import save_for_hf

    data = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.8, "interpolation": "bilinear"}
    cfg = {"label_names": LABELS}
    save_for_hf(model, str(folder), model_config=cfg, data_config=data, safe_serialization="both")
    return folder


@pytest.fixture(scope="module")
def timm_repo(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = timm_model()
    return model, save_timm(model, tmp_path_factory.mktemp("timm"))


@pytest.fixture(scope="module")
def hf_repo(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = randomize(ViTForImageClassification(cfg))
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    size = {"height": 32, "width": 32}
    ViTImageProcessor(image_mean=[0.4] * 3, image_std=[0.2] * 3, resample=3, size=size).save_pretrained(folder)
    return model, folder


def logits_diff(model: torch.nn.Module, peer: torch.nn.Module) -> float:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = peer(x) if not hasattr(peer, "vit") else peer(pixel_values=x).logits
        return (model(x) - out).abs().max().item()


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name,expected",
    [
        (f"hf-hub:timm/{TAGGED}", HubName(f"timm/{TAGGED}")),
        (f"timm/{TAGGED}", HubName(f"timm/{TAGGED}")),
        (TAGGED, HubName(f"timm/{TAGGED}")),  # timm's name with its pretrained tag: timm's repo of it
        ("google/vit-base-patch16-224", HubName("google/vit-base-patch16-224")),
        ("google/vit-base-patch16-224@v2", HubName("google/vit-base-patch16-224", "v2")),
        ("hf-hub:google/vit-base-patch16-224@" + "a" * 40, HubName("google/vit-base-patch16-224", "a" * 40)),
        ("vit_base_patch16_224", ArchitectureName("vit_base_patch16_224")),
        ("S/16", ArchitectureName("S/16")),  # big_vision's spelling, not a repo
        ("deit_small_patch16_224", ArchitectureName("deit_small_patch16_224")),  # timm knows it, vitkit does not
        ("local-dir:/some/folder", Path("/some/folder")),
        ("runs/model.safetensors", Path("runs/model.safetensors")),  # a file suffix: a (missing) path
        ("model.pth", Path("model.pth")),
        ("./google/vit", Path("google/vit")),
        ("runs/exp1/model", Path("runs/exp1/model")),  # several folders: a path
        ("not a name", Path("not a name")),
    ],
)
def test_names_resolve_to_paths_repos_or_architectures(name, expected):
    assert parse_name(name) == expected


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "google" / "vit-base-patch16-224").mkdir(parents=True)
    assert parse_name("google/vit-base-patch16-224") == Path("google/vit-base-patch16-224")
    assert parse_name(Path("timm/absent")) == Path("timm/absent")  # a Path object is always a path
    assert names_weights("google/vit-base-patch16-224") and names_weights("timm/x.y")
    assert not names_weights("vit_small_patch16_224") and not names_weights("runs/missing.safetensors")


def test_a_bare_timm_name_takes_timms_default_tag_or_asks_for_one(monkeypatch):
    repo = default_weights(ArchitectureName("vit_base_patch16_224"))
    default_tag = timm.models.get_pretrained_cfg("vit_base_patch16_224").tag
    assert repo == HubName(f"timm/vit_base_patch16_224.{default_tag}")
    with pytest.raises(CheckpointError, match="timm knows no Hub weights"):
        default_weights(ArchitectureName("S/16"))
    monkeypatch.setitem(sys.modules, "timm.models", None)  # as if timm were not installed
    with pytest.raises(CheckpointError, match=r"add a pretrained tag .*'vit_base_patch16_224\.<tag>'") as e:
        vitkit.from_pretrained("vit_base_patch16_224")
    one_line(e)


def test_a_timm_name_vitkit_cannot_build_says_why_before_any_download():
    with pytest.raises(CheckpointError, match="relative-position"):
        parse_name("vit_relpos_base_patch16_224")


def test_safetensors_is_chosen_before_any_pickle():
    both = ["config.json", "pytorch_model.bin", "model.safetensors", "README.md", "preprocessor_config.json"]
    assert choose_files("r", both) == ["config.json", "preprocessor_config.json", "model.safetensors"]
    assert choose_files("r", ["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]
    assert choose_files("r", ["README.md", "weights.pth", "weights.safetensors"]) == ["weights.safetensors"]
    with pytest.raises(CheckpointError, match="several weights files"):
        choose_files("r", ["a.pth", "b.pth"])
    with pytest.raises(CheckpointError, match="no weights file vitkit reads"):
        choose_files("r", ["README.md", "sub/model.safetensors"])


def test_the_model_package_points_pretrained_at_vitkit_create_model():
    from vitkit.model import create_model

    with pytest.raises(ValueError, match=r"vitkit\.create_model"):
        create_model("vit_small_patch16_224", pretrained=True)
    assert vitkit.create_model("S/16", img_size=32, depth=1).cfg.depth == 1  # no pretrained: random, no network


# ------------------------------------------------------------------------------------------ downloading
def test_timm_repo_by_tagged_name_parity_preprocessing_labels_and_provenance(hub, timm_repo):
    peer, folder = timm_repo
    sha = hub.add_repo(TIMM_REPO, folder)
    model, report = load_with_report(TIMM_NAME)
    assert logits_diff(model, peer) <= TOL
    assert model.labels == LABELS and model.cfg.num_heads == 4
    assert model.preprocess.mean == (0.1, 0.2, 0.3) and model.preprocess.interpolation == "bilinear"
    assert hub.downloads("model.safetensors") and not hub.downloads("pytorch_model.bin")  # safetensors only
    origin = report.origin
    assert origin.repo_id == TIMM_REPO and origin.commit == sha and origin.revision == "main" and not origin.offline
    assert origin.files == ("config.json", "model.safetensors")
    assert Path(origin.cache_path).is_dir() and sha in origin.cache_path
    assert report.summary().startswith(f"'{TIMM_REPO}@{sha[:12]}'")
    assert f"from: Hub repo '{TIMM_REPO}' revision main, commit {sha}" in report.details()
    for spelling in (f"hf-hub:{TIMM_REPO}", TIMM_REPO):  # the other spellings of the same repo
        assert logits_diff(vitkit.from_pretrained(spelling), peer) <= TOL


def test_transformers_repo_parity_labels_and_preprocessing(hub, hf_repo):
    peer, folder = hf_repo
    hub.add_repo(HF_REPO, folder)
    model = vitkit.from_pretrained(HF_REPO)
    assert logits_diff(model, peer) <= TOL
    assert model.labels == LABELS
    assert model.preprocess.mean == (0.4, 0.4, 0.4) and model.preprocess.interpolation == "bicubic"
    assert hub.downloads("preprocessor_config.json")


def test_a_pickle_only_repo_loads_its_pickle(hub, timm_repo, tmp_path):
    peer, folder = timm_repo
    files = {k: v for k, v in read_folder(folder).items() if k != "model.safetensors"}
    hub.add_repo("someone/pickled-vit", files)
    assert logits_diff(vitkit.from_pretrained("someone/pickled-vit"), peer) <= TOL


def test_a_repo_of_one_vitkit_file_loads_online_and_offline(hub, tmp_path):
    mine = vitkit.create_model("S/16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    mine.labels = LABELS
    path = mine.save(tmp_path / "tiny-vit.safetensors")
    hub.add_repo("someone/vitkit-file", {"README.md": b"# a vitkit model", "tiny-vit.safetensors": path.read_bytes()})
    for options in ({}, {"local_files_only": True}):  # downloaded, then found in the cache by its odd name
        model, report = load_with_report("someone/vitkit-file", **options)
        assert report.format == "vitkit" and report.origin.files == ("tiny-vit.safetensors",)
        state = model.state_dict()
        assert model.labels == LABELS and all(torch.equal(v, state[k]) for k, v in mine.state_dict().items())


def test_local_dir_names_a_timm_folder(timm_repo):
    peer, folder = timm_repo
    assert logits_diff(vitkit.from_pretrained(f"local-dir:{folder}"), peer) <= TOL


def test_timm_push_to_hf_hub_then_create_model_pretrained(hub):
    from timm.models import push_to_hf_hub

    peer = timm_model(seed=2)
    push_to_hf_hub(peer, "someone/pushed-by-timm", token=TOKEN, model_config={"label_names": LABELS})
    model = vitkit.create_model("hf-hub:someone/pushed-by-timm", pretrained=True, num_classes=5)
    assert model.cfg.num_classes == 5 and torch.count_nonzero(model.head.weight) == 0  # overrides applied
    assert logits_diff(vitkit.create_model("someone/pushed-by-timm", pretrained=True), peer) <= TOL


# ------------------------------------------------------------------------------------- cache and offline
def test_second_load_comes_from_the_cache_when_the_hub_is_gone(hub, timm_repo):
    peer, folder = timm_repo
    hub.add_repo(TIMM_REPO, folder)
    hub.add_repo("someone/never-downloaded", folder)
    vitkit.from_pretrained(TIMM_REPO)
    hub.stop()
    model, report = load_with_report(TIMM_REPO)
    assert logits_diff(model, peer) <= TOL and report.origin.offline
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained("someone/never-downloaded")
    assert time.monotonic() - start < 10
    text = one_line(e)
    assert "'someone/never-downloaded'" in text and "cannot connect" in text
    assert re.search(r"run once with network access, or `(hf|huggingface-cli) download someone/never-downloaded`", text)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_offline_reads_the_cache_without_a_request_and_names_what_is_missing(hub, timm_repo, monkeypatch, how):
    peer, folder = timm_repo
    hub.add_repo(TIMM_REPO, folder)
    hub.add_repo("someone/uncached", folder)
    vitkit.from_pretrained(TIMM_REPO)
    before = len(hub.requests)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = {"local_files_only": True} if how == "local_files_only" else {}
    model, report = load_with_report(TIMM_REPO, **options)
    assert logits_diff(model, peer) <= TOL and report.origin.offline
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained("someone/uncached", revision="v1", **options)
    assert time.monotonic() - start < 5
    assert len(hub.requests) == before  # not one request went out
    text = one_line(e)
    assert "'someone/uncached' (revision v1) is not in the Hub cache" in text and how in text
    assert re.search(r"`(hf|huggingface-cli) download someone/uncached --revision v1`", text)
    assert text.endswith("or pass a local path")


def test_revisions_pick_their_commit(hub, timm_repo, tmp_path):
    old_peer, folder = timm_repo
    old = hub.add_repo(TIMM_REPO, folder)
    new_peer = timm_model(seed=3)
    new = hub.add_repo(TIMM_REPO, save_timm(new_peer, tmp_path / "v2"))
    assert logits_diff(vitkit.from_pretrained(TIMM_REPO), new_peer) <= TOL
    assert logits_diff(vitkit.from_pretrained(TIMM_REPO, revision=old), old_peer) <= TOL
    before = len(hub.requests)
    _, report = load_with_report(f"{TIMM_REPO}@{old}")
    assert report.origin.commit == old and report.origin.revision == old
    assert len(hub.requests) == before  # a cached commit never changes: no request
    hub.stop()  # both commits are cached, each under its own revision
    assert load_with_report(TIMM_REPO)[1].origin.commit == new
    assert load_with_report(TIMM_REPO, revision=old)[1].origin.commit == old


def test_a_missing_revision_repo_or_file_is_one_line(hub, timm_repo):
    _, folder = timm_repo
    hub.add_repo(TIMM_REPO, folder)
    with pytest.raises(CheckpointError, match=rf"'{TIMM_REPO}' has no revision 'v9'") as e:
        vitkit.from_pretrained(TIMM_REPO, revision="v9")
    one_line(e)
    with pytest.raises(CheckpointError, match="'someone/absent' is neither a local path nor a model repo") as e:
        vitkit.from_pretrained("someone/absent")
    one_line(e)
    hub.add_repo("someone/card-only", {"README.md": b"# no weights"})
    with pytest.raises(CheckpointError, match="'someone/card-only' has no weights file vitkit reads") as e:
        vitkit.from_pretrained("someone/card-only")
    one_line(e)


# ------------------------------------------------------------------------------------- access control
def test_a_private_repo_needs_a_token(hub, timm_repo, monkeypatch):
    peer, folder = timm_repo
    hub.add_repo("someone/private-vit", folder, private=True)
    with pytest.raises(CheckpointError, match="or it is private and no valid token was sent") as e:
        vitkit.from_pretrained("someone/private-vit")
    assert "HF_TOKEN" in one_line(e)
    assert logits_diff(vitkit.from_pretrained("someone/private-vit", token=TOKEN), peer) <= TOL
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment, as huggingface_hub reads it
    assert logits_diff(vitkit.from_pretrained("someone/private-vit"), peer) <= TOL


def test_a_gated_repo_says_so(hub, timm_repo):
    hub.add_repo("someone/gated-vit", timm_repo[1], gated=True)
    with pytest.raises(CheckpointError, match=r"'someone/gated-vit' is gated: accept its conditions at http") as e:
        vitkit.from_pretrained("someone/gated-vit")
    one_line(e)


# ------------------------------------------------------------------------------------- broken transfers
def test_a_download_cut_short_once_resumes_to_the_exact_file(hub, timm_repo):
    peer, folder = timm_repo
    hub.add_repo(TIMM_REPO, folder)
    hub.truncate(TIMM_REPO, "model.safetensors", keep_bytes=1000, times=1)
    try:
        model = vitkit.from_pretrained(TIMM_REPO)
    except CheckpointError as e:  # huggingface_hub before 1.0 resumes on the next call, not within this one
        assert "the download was interrupted" in str(e)
        model = vitkit.from_pretrained(TIMM_REPO)
    assert logits_diff(model, peer) <= TOL
    assert len(hub.downloads("model.safetensors")) == 2  # the cut one, then the rest by Range


def test_a_download_that_keeps_breaking_fails_and_leaves_nothing_loadable(hub, timm_repo, tmp_path):
    _, folder = timm_repo
    hub.add_repo(TIMM_REPO, folder)
    hub.truncate(TIMM_REPO, "model.safetensors", keep_bytes=1000)
    with pytest.raises(CheckpointError, match="the download was interrupted") as e:
        vitkit.from_pretrained(TIMM_REPO)
    assert f"'model.safetensors' of '{TIMM_REPO}'" in one_line(e)
    cache = tmp_path / "hf-cache"
    complete = [p for p in cache.rglob("*") if p.is_file() and p.parent.name == "blobs" and p.suffix != ".incomplete"]
    assert all(p.stat().st_size != 1000 for p in complete)  # config.json only: no blob of the cut size
    assert not list(cache.rglob("model.safetensors"))  # no snapshot entry for the broken file
    with pytest.raises(CheckpointError, match="has no weights file in the Hub cache") as e:
        vitkit.from_pretrained(TIMM_REPO, local_files_only=True)
    assert "interrupted" in one_line(e)


def test_corrupted_weights_are_a_checkpoint_error(hub, timm_repo):
    files = read_folder(timm_repo[1])
    files["model.safetensors"] = b"\x00" * 64 + files["model.safetensors"][64:]
    hub.add_repo("someone/corrupted", files)
    with pytest.raises(CheckpointError) as e:
        vitkit.from_pretrained("someone/corrupted")
    assert "model.safetensors" in str(e.value)


def test_a_server_that_does_not_answer_times_out(hub, timm_repo, monkeypatch):
    from huggingface_hub import constants

    hub.add_repo(TIMM_REPO, timm_repo[1])
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    hub.stall(30)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="no answer from http://127.0.0.1:.* in time; HF_HUB_ETAG_TIMEOUT") as e:
        vitkit.from_pretrained(TIMM_REPO)
    assert time.monotonic() - start < 10
    one_line(e)


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_predict_by_name_and_a_missing_name_is_one_line(hub, timm_repo, tmp_path, capsys):
    from vitkit.cli import main

    hub.add_repo(TIMM_REPO, timm_repo[1])
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    assert main(["predict", TIMM_NAME, str(image), "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert any(label in out for label in LABELS)
    assert main(["predict", "someone/absent", str(image)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vitkit predict: error: 'someone/absent' is neither a local path nor a model repo")
    assert not any("Traceback" in line for line in err)


def labelled_folder(root: Path, per_class: int = 4) -> Path:
    """The repo's three classes, a few 32x32 images each."""
    rng = np.random.default_rng(0)
    for name in LABELS:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_every_loading_verb_takes_a_name(hub, timm_repo, tmp_path, monkeypatch, capsys):
    from vitkit.cli import main
    from vitkit.commands.export import default_output

    peer, folder = timm_repo
    sha = hub.add_repo(TIMM_REPO, folder)
    monkeypatch.chdir(tmp_path)
    data = labelled_folder(tmp_path / "data")
    assert main(["embed", TIMM_NAME, str(data / "ant"), "-o", "feats.npy"]) == 0
    assert np.load("feats.npy").shape == (4, 32)
    assert main(["evaluate", TIMM_REPO, "--data", str(data), "--json"]) == 0
    assert '"top1"' in capsys.readouterr().out
    assert main(["convert", f"hf-hub:{TIMM_REPO}", "converted.safetensors"]) == 0
    assert logits_diff(vitkit.from_pretrained("converted.safetensors"), peer) <= TOL
    assert read_metadata("converted.safetensors")["converted_from"] == f"{TIMM_REPO}@{sha}"  # the exact commit
    common = ["--data", str(data), "--epochs", "1", "--no-progress", "--threads", "1", "--cache-dir", "cache"]
    assert main(["finetune", "--from", TIMM_NAME, *common, "--out", "ft"]) == 0
    assert main(["train", "--model", TIMM_REPO, *common, "--out", "tr"]) == 0
    for run in ("ft", "tr"):  # both started from the repo's weights: its preprocessing came along
        assert vitkit.from_pretrained(Path(run) / "model.safetensors").preprocess.mean == (0.1, 0.2, 0.3)
    assert default_output(TIMM_NAME, "onnx") == Path("vit_tiny_patch16_224.vitkit_test.onnx")
    assert default_output("google/vit-base-patch16-224", "pt2") == Path("vit-base-patch16-224.pt2")
    assert default_output("runs/a/model.safetensors", "onnx") == Path("runs/a/model.onnx")
