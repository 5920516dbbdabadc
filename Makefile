# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up (a venv with torch 2.14.1 / torchvision 0.29.1 and vitkit with its extras) runs once; later runs reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitkit-installed
TORCH := torch==2.14.1 torchvision==0.29.1
MINIMAL_VENV ?= build/venv-minimal
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup kernels demo test test-no-kernels test-minimal test-slow lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[plot,digits,serve,onnx,dev,kernels,stream]'
	touch $(STAMP)

setup: $(STAMP)

# The CPU kernels (attention, LayerNorm; vitkit/model/cpu_kernels.py): compiled once per machine (~25 s), a no-op
# after that; where the CPU or toolchain cannot build them, it says why and the fast path keeps PyTorch's ops.
kernels: setup
	$(VENV)/bin/vitkit kernels build --if-supported

demo: kernels
	$(VENV)/bin/vitkit demo --out runs/demo

test: kernels
	$(PY) -m pytest -q -m "not slow"

# The tests that run the model forward and backward (inference, training, the fast path) once more as on a machine
# where the CPU kernels are not built or not supported: every op on PyTorch's fallback. Not the whole suite: the
# data, decoding, interop and serving tests do not reach the kernels, and would double CI time.
NO_KERNEL_TESTS := $(addprefix tests/test_,model.py fast_inference.py fast_training.py last_block_queries.py \
	speed_correctness.py cpu_kernels.py predict.py explain.py api.py train.py train_resume.py train_cli.py)
test-no-kernels: setup
	VITKIT_CPU_KERNELS=0 $(PY) -m pytest -q -m "not slow" $(NO_KERNEL_TESTS)

# A user's install without the optional extras, in a fresh venv: torch, torchvision, then `pip install .`.
# tests/minimal_install.py imports, saves, loads and predicts there, and checks that verbs needing an extra
# (serve, ONNX export, plot) fail with one line naming it. The venv (~5 GB with torch's CUDA libraries) is removed
# after a pass and kept after a failure, to look into.
test-minimal:
	rm -rf $(MINIMAL_VENV)
	python3 -m venv $(MINIMAL_VENV)
	$(MINIMAL_VENV)/bin/python -m pip install -q $(TORCH)
	$(MINIMAL_VENV)/bin/python -m pip install -q .
	cd $(MINIMAL_VENV) && bin/python $(CURDIR)/tests/minimal_install.py
	rm -rf $(MINIMAL_VENV)

# Debian's Chromium for the Playwright browser test (tests/test_browser.py skips without it unless CI=true).
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test-slow: kernels
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: kernels
	$(PY) benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache $(MINIMAL_VENV)
