# `make demo` and `make test` work on a fresh machine with only Python 3.11:
# each creates .venv when it is missing and installs qatkit with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds this workplace ships on disk; anywhere else
# any torch>=2.1 works (setup.cfg).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench lint venv clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

# -q still ends with pytest's summary line ("N passed, M deselected in Xs")
test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m pytest -q -m slow
	$(PY) benchmarks/fake_quant.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
