# Set-up and entry points. `make test` and `make demo` each create .venv on
# first use and install tfopt into it with its development extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench zoo clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/tfopt run recipes/digits_prune_qat.yaml --output runs/digits_prune_qat

bench: $(STAMP)
	$(PY) benchmarks/pruning_overhead.py
	$(PY) benchmarks/qat.py

# Every keras.applications architecture and six keras-hub backbones through
# prune -> strip -> QAT -> export -> validation; writes docs/support.md. Rows
# are cached in benchmarks/results/zoo.json: rerun to continue where it stopped
# (about 5 hours on 2 CPU cores from scratch: the 38 smaller rows take 3.2 h,
# the 8 largest 10-25 minutes each).
zoo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/zoo.py --resume

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
