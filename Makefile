# The two commands: `make run` (the pipeline on embedded defaults) and `make test`.
# Both create .venv when missing and install what they need: torch 2.13.0 first (a CPU
# build on this machine's disk), then ldmflow with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldmflow-installed
STATE ?= .ldmflow

.PHONY: install run test bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ldmflow --state-dir $(STATE) pipeline --config configs/tiny.yaml

test: $(STAMP) browser
	$(PY) -m pytest

# The sampler page's browser test drives the system's Chromium and chromedriver. As root,
# install them with the system's package manager where they are missing; elsewhere the
# test says it is skipped and why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (the page's browser test)"; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	      echo "could not install chromium: the page's browser test will be skipped"; \
	  fi; \
	fi

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
