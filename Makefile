# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install pinned deps, run the default pipeline end to end
#   make test   - create .venv, install pinned deps, run the test suite (.ci/run calls this)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdpipe-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint docs bench pipelines clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the CPU wheel found locally; the constraints file keeps every other package on it.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	# compat: the project dir goes on sys.path, so Ray workers started in a directory that holds its own
	# `teachers/` or `students/` folder still import kdpipe's packages (the default finder loses to it)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
	# real offline English text for pipelines/minilm_*.yaml (WordNet 3.0 glosses, 28 MB)
	test -d /usr/share/wordnet || (apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base)
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/kdpipe run pipelines/digits_kd.yaml

test: install lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run_all.py
	$(BIN)/python scripts/gen_docs.py

docs: install
	$(BIN)/python scripts/gen_docs.py

clean:
	rm -rf .kdpipe mlruns.db mlartifacts
