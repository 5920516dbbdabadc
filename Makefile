# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up (a venv with torch 2.14.1 / torchvision 0.29.1 and vitkit with its extras) runs once; later runs reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitkit-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup kernels demo test test-slow lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[plot,digits,serve,onnx,dev,kernels]'
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
	rm -rf runs .pytest_cache
