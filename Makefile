# The two commands: `make run` (the pipeline on embedded defaults) and `make test`.
# Both create .venv when missing and install what they need: torch 2.13.0 first (a CPU
# build on this machine's disk), then ldmflow with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldmflow-installed
STATE ?= .ldmflow

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ldmflow --state-dir $(STATE) pipeline --config configs/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/shard.py
	$(PY) benchmarks/precompute.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(STATE) .pytest_cache
