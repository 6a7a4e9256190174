# One virtual environment (.venv) serves every target; it is created or updated only when
# pyproject.toml or constraints.txt change.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint format assets browser bench experiments clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,milvus,dev]' 2>&1 \
		| { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/python -c "import lexvla, torch; print('lexvla', lexvla.__version__, 'torch', torch.__version__)"
	@touch $(STAMP)

venv: $(STAMP)

# Fetch and convert the offline real models (idempotent; seconds when already prepared).
assets: $(STAMP)
	$(BIN)/lexvla assets prepare

# The main job: the demo (prepares the offline models if needed).
demo: $(STAMP)
	$(BIN)/lexvla demo

# Debian's Chromium for the end-to-end browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The whole test suite, real-model and browser tests included (what CI runs).
test: $(STAMP) assets browser
	$(BIN)/pytest $(PYTEST_ARGS)

# The inner loop: no real models, nothing slow.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not assets" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --no-cache src tests bench scripts
	$(BIN)/ruff format --no-cache --check src tests bench scripts
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The paper-claim experiments (about an hour on 2 CPU cores): JSON + figures, then docs/results.md.
experiments: $(STAMP) assets
	nice -n 5 $(BIN)/python experiments/run.py
	$(BIN)/python scripts/make_results_doc.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
