# Two commands for a new user: `make demo` and `make test`.
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
# GPU users: `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
EXTRAS ?= attack,plot,onnx,tensorboard,bench,dev
DEMO_OUT ?= runs/demo

.PHONY: demo test lint mypy-baseline venv clean

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(VENV)/bin/lipnet sweep --config experiments/configs/demo.yaml --taus 5,20,50 --jobs 3 --out $(DEMO_OUT)

# ruff (lint and formatting), then mypy through the baseline gate: certify/ clean, lipnet/ no error beyond
# mypy-baseline.txt.
lint: venv
	$(VENV)/bin/ruff check lipnet certify tests experiments tools
	$(VENV)/bin/ruff format --check lipnet certify tests experiments tools
	$(PY) tools/mypy_gate.py

# Delete the baseline's lines for errors that no longer occur (it never adds one); commit the file.
mypy-baseline: venv
	$(PY) tools/mypy_gate.py --update

test: lint
	$(VENV)/bin/pytest -n 2 -q

clean:
	rm -rf $(VENV) runs .pytest_cache
