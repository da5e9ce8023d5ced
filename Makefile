# `make demo` and `make test` work on a fresh machine with only Python 3.11:
# each creates .venv when it is missing and installs qatkit with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds this workplace ships on disk; anywhere else
# any torch>=2.1 works (setup.cfg).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench lint venv browser clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

# headless Chromium for tests/profiler/report/test_browser.py (the HTML report in a real browser):
# Debian's package, installed when missing and apt-get can run (root or password-less sudo);
# otherwise that test file skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    echo "installing chromium (apt-get) for the browser tests"; \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends chromium; } >/dev/null \
	      || echo "could not install chromium: tests/profiler/report/test_browser.py will be skipped"; \
	  else \
	    echo "no chromium and no apt-get as root: tests/profiler/report/test_browser.py will be skipped"; \
	  fi; }

# -q still ends with pytest's summary line ("N passed, M deselected in Xs")
test: venv browser
	$(PY) -m pytest -q

# the slow model-zoo sweeps, then every benchmark script (each prints its ratios)
bench: venv
	$(PY) -m pytest -q -m slow
	for b in fake_quant qat_step simulator exact_eval profiler model_profiler export_onnx ptq; do \
	  echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
