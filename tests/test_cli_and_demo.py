import subprocess
import sys

import pytest

from vitkit.cli import discover, main


def test_help_for_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    verbs = discover()
    assert "demo" in verbs
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert verb in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "vitkit", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_demo_smoke(tmp_path):
    from vitkit.demo import run_demo

    res = run_demo(tmp_path, epochs=2)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert 0.0 <= res["accuracy"] <= 1.0
