"""vitkit.allocator: the `vitkit` command fixes glibc's malloc thresholds for itself; the library never does."""

import platform

import pytest

from vitkit import allocator, cli

from .conftest import run_python

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_configure_fixes_the_thresholds_and_can_be_turned_off(monkeypatch):
    assert allocator.configure().startswith("fixed (mmap threshold 32 MiB, trim 128 MiB)")
    monkeypatch.setenv("VITKIT_MALLOC", "default")
    assert allocator.configure() == "default (VITKIT_MALLOC=default)"


def test_the_command_configures_the_allocator_for_every_verb(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(allocator, "configure", lambda: calls.append(1) or "fixed")
    code = cli.main(["predict", str(tmp_path / "missing.safetensors"), str(tmp_path / "missing.jpg")])
    assert code == 1 and calls == [1]  # configured before the verb ran (and failed on the missing file)
    assert "error" in capsys.readouterr().err


@glibc
def test_importing_vitkit_leaves_the_allocator_alone():
    """A spy on ctypes sees no mallopt while vitkit is imported and used, and sees configure()'s (the spy works)."""
    probe = (
        "import ctypes, sys\n"
        "calls = []\n"
        "real = ctypes.CDLL\n"
        "class Spy:\n"
        "    def __init__(self, *a, **k): self._lib = real(*a, **k)\n"
        "    def __getattr__(self, name):\n"
        "        if name == 'mallopt': calls.append(name)\n"
        "        return getattr(self._lib, name)\n"
        "ctypes.CDLL = Spy\n"
        "import vitkit, vitkit.model, vitkit.train, vitkit.infer\n"
        "vitkit.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1)\n"
        "before = len(calls)\n"
        "import vitkit.allocator\n"
        "vitkit.allocator.configure()\n"
        "print(before, len(calls))\n"
    )
    out = run_python(["-c", probe], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "2"]  # none on import or use; two (mmap, trim) when asked
