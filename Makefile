# Two commands do everything: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test test-deps bench lint container-test clean

venv: $(STAMP)

# torch first, pinned, so nothing pulls a multi-GB CUDA build; then the project with its test extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(PY) -m duet.demo

# Real servers the tests start: Debian's redis-server (installed once, quietly, if missing).
test-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package) for the tests"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is still missing"; exit 1; }

test: venv test-deps
	$(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

bench: venv
	$(PY) bench/signaling.py
	$(PY) bench/transport.py
	$(PY) bench/ops.py

lint: venv
	$(VENV)/bin/ruff check duet signaling_server kernel_ext tests bench
	$(VENV)/bin/mypy

container-test: venv
	bash scripts/container-test.sh

clean:
	rm -rf $(VENV) build *.egg-info
