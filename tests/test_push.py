"""`vitkit push`: upload the save_pretrained folder with huggingface_hub, then load it back by name.

Runs against the Hub stand-in (tests/hub_server.py, reached through HF_ENDPOINT): the uploaded repo is read back
by vitkit and by the peer library of its format, with logit parity; failures (no token, a refused token, the Hub
gone, a format that cannot express the model) are one line each, and nothing is sent for a model the format
refuses.
"""

import pytest
import torch

import vitkit
from tests.hub_server import TOKEN, USER
from vitkit.cli import main
from vitkit.interop.push import PushError, push_to_hub
from vitkit.model.serialization import ExportError

pytest.importorskip("huggingface_hub")
TOL = 1e-4
REPO = f"{USER}/tiny-vit"


def tiny(**kw) -> vitkit.VisionTransformer:
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3)
    model = vitkit.create_model(vitkit.ViTConfig(**{**base, **kw}))
    with torch.no_grad():
        model.head.bias.normal_()  # a head that is not zero, so the logits show a wrong one
    model.labels = ["ant", "bee", "cow"]
    return model.eval()


def same_logits(a: torch.nn.Module, b: vitkit.VisionTransformer) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = a(x)
        out = out.logits if hasattr(out, "logits") else out
        return (out - b(x)).abs().max().item() <= TOL


def test_push_vitkit_format_then_load_by_name(hub):
    model = tiny()
    url = push_to_hub(model, REPO, token=TOKEN)
    assert url.startswith(hub.url) and REPO in url
    files = hub.files(REPO)
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert b"library_name: vitkit" in files["README.md"] and REPO.encode() in files["README.md"]
    back = vitkit.from_pretrained(REPO)
    assert same_logits(back, model) and back.labels == model.labels


def test_push_hf_format_loads_in_transformers(hub):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    push_to_hub(model, REPO, format="hf", token=TOKEN, commit_message="first")
    assert hub.repos[REPO].commits[-1].message == "first"
    peer = transformers.ViTForImageClassification.from_pretrained(REPO).eval()
    assert same_logits(peer, model) and peer.config.id2label == {0: "ant", 1: "bee", 2: "cow"}


def test_push_timm_format_loads_in_timm(hub):
    timm = pytest.importorskip("timm")
    model = tiny()
    push_to_hub(model, REPO, format="timm", token=TOKEN)
    peer = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert same_logits(peer, model) and peer.pretrained_cfg["label_names"] == ["ant", "bee", "cow"]


def test_push_private_repo_needs_the_token_to_read(hub):
    push_to_hub(tiny(), REPO, token=TOKEN, private=True)
    assert hub.repos[REPO].private
    with pytest.raises(vitkit.model.CheckpointError):
        vitkit.from_pretrained(REPO)
    assert vitkit.from_pretrained(REPO, token=TOKEN).labels == ["ant", "bee", "cow"]


def test_push_to_a_branch_leaves_main_alone(hub):
    first, second = tiny(), tiny()
    push_to_hub(first, REPO, token=TOKEN)
    push_to_hub(second, REPO, token=TOKEN, revision="v2")
    assert same_logits(vitkit.from_pretrained(REPO), first)
    assert same_logits(vitkit.from_pretrained(REPO, revision="v2"), second)


def test_push_keeps_a_readme_already_in_the_repo(hub):
    hub.add_repo(REPO, {"README.md": b"# written on the Hub\n"})
    push_to_hub(tiny(), REPO, token=TOKEN)
    files = hub.files(REPO)
    assert files["README.md"] == b"# written on the Hub\n" and "model.safetensors" in files


def test_push_without_a_token_says_how_to_get_one(hub):
    with pytest.raises(PushError, match=r"needs a Hugging Face token .*--token, set HF_TOKEN or run `hf auth login`"):
        push_to_hub(tiny(), REPO)
    assert hub.requests == []


def test_push_with_a_refused_token_is_one_line(hub):
    with pytest.raises(PushError) as err:
        push_to_hub(tiny(), REPO, token="hf_wrong")
    assert "\n" not in str(err.value) and "refused the token" in str(err.value) and "401" in str(err.value)


def test_push_with_the_hub_unreachable_is_one_line(hub):
    endpoint = hub.url
    hub.stop()
    with pytest.raises(PushError) as err:
        push_to_hub(tiny(), REPO, token=TOKEN)
    assert "\n" not in str(err.value) and f"cannot reach the Hub at {endpoint}" in str(err.value)


def test_push_of_a_model_the_format_cannot_express_sends_nothing(hub):
    with pytest.raises(ExportError, match="conv stem"):
        push_to_hub(tiny(stem="conv"), REPO, format="hf", token=TOKEN)
    assert hub.requests == []


def test_push_cli(hub, tmp_path, capsys):
    ckpt = tiny().save(tmp_path / "model.safetensors")
    assert main(["push", str(ckpt), REPO, "--format", "timm", "--token", TOKEN, "--private"]) == 0
    assert f"pushed {ckpt} to {REPO} as a timm folder: {hub.url}" in capsys.readouterr().out
    assert hub.repos[REPO].private and "config.json" in hub.files(REPO)
    assert main(["push", str(ckpt), REPO, "--token", "hf_wrong"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vitkit push: error: the Hub refused the token")
