"""`vitkit train`, `vitkit evaluate --json`, `vitkit plot` end to end on a generated image folder (seconds)."""

import json

from vitkit.cli import main
from vitkit.interop import from_pretrained
from vitkit.train.fit import default_model

from .conftest import make_image_folder


def test_default_model_by_image_size():
    assert default_model((8, 8))[0] == "vit_digits_patch2_8"
    assert default_model((32, 32)) == ("vit_cifar_patch4_32", {"img_size": (32, 32)})
    assert default_model((500, 375)) == ("vit_tiny_patch16_224", {"img_size": (224, 224)})


def test_train_evaluate_plot_cli(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs")  # red, green and blue 16x16 squares
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--ema-decay",
        "0.9",
        "--val-split",
        "0.25",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model: " in out and (run / "model.safetensors").is_file() and (run / "last.ckpt").is_file()
    model = from_pretrained(run / "model.safetensors")
    assert model.labels == ["blue", "green", "red"]
    assert model.preprocess.input_size == (16, 16) and model.cfg.num_classes == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"info", "train", "val", "final"} <= {r["kind"] for r in records}
    assert records[-1]["kind"] == "final" and records[-1]["val_top1"] >= 0.9  # an untrained model: about 1/3

    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--epochs",
                "3",
                "--batch-size",
                "16",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-progress",
                "--lr",
                "1.0",
            ]
        )
        == 1
    )
    assert "other settings" in capsys.readouterr().err  # a resumed run refuses changed settings

    assert (
        main(
            [
                "evaluate",
                str(run / "model.safetensors"),
                "--data",
                str(data),
                "--json",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert {"top1", "top5", "per_class"} <= set(report)
    assert set(report["per_class"]) == {"blue", "green", "red"} and report["top5"] == 1.0  # k = 3 classes
    assert report["top1"] >= 0.9  # one colour per class: a trainer that learns at all separates them
    assert (run / "confusion_imgs.png").stat().st_size > 1000

    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000
