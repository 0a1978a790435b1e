# Two commands do everything: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo lab test test-deps bench lint container-test clean

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

# JupyterLab on 127.0.0.1 with the demo notebooks: open owner.ipynb and researcher.ipynb side
# by side and run them top to bottom. DUET_LAB_PORT picks the port (default 8888).
lab: venv
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PIP) install --quiet -e ".[lab]"
	@echo "duet: open owner.ipynb and researcher.ipynb side by side and run them top to bottom"
	$(VENV)/bin/jupyter lab --no-browser --ip 127.0.0.1 --port $${DUET_LAB_PORT:-8888} \
		--ServerApp.port_retries=0 --ServerApp.root_dir=notebooks \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

# What the tests drive besides Python packages: Debian's redis-server (a real Redis) and
# chromium (the browser test; Playwright from PyPI drives it, its own download cannot run
# here). Installed once, quietly, if missing.
test-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing for the tests (Debian packages):$$missing"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is still missing"; exit 1; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium is still missing"; exit 1; }

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
