# formers: `make demo` trains the demo recipe, `make test` runs the tests. Both set themselves up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.formers-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)
	@bash scripts/debian_packages.sh
	@$(BIN)/formers data fetch --defaults

# torch is pinned to the CPU build that lies on local disk (2.13.0); never let pip pick a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,peers]'
	@touch $(STAMP)

demo: setup
	$(BIN)/formers train lm_shakespeare --out runs/lm_shakespeare --force

test: setup
	$(BIN)/python -m pytest --junitxml=.junit/pytest.xml

lint: setup
	$(BIN)/ruff check formers tests benchmarks

bench: setup
	$(BIN)/python benchmarks/peers_speed.py

clean:
	rm -rf runs .pytest_cache .junit
