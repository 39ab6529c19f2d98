# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WORLD  := out/demo_world
WAREHOUSE := out/warehouse.duckdb
AS_OF   = $$($(BIN)/python -c "import json; print(json.load(open('$(WORLD)/world.json'))['as_of'])")

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(WORLD)/world.json: $(VENV)/.installed
	$(BIN)/python -m pipelines.generate_world --preset demo --seed 7 --out $(WORLD)

demo: $(WORLD)/world.json
	$(BIN)/python -m pipelines.batch_recommendations --input_dir $(WORLD) \
	    --warehouse $(WAREHOUSE) --as_of $(AS_OF)
	$(BIN)/python -m pipelines.backtest --input_dir $(WORLD) --warehouse $(WAREHOUSE) \
	    --as_of $(AS_OF)
	$(BIN)/python -m pipelines.bandit_report --input_dir $(WORLD) --warehouse $(WAREHOUSE)
	$(BIN)/python -m pipelines.campaign_report --input_dir $(WORLD) --warehouse $(WAREHOUSE) \
	    --report_html out/campaign_report.html

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2

bench: $(VENV)/.installed
	$(BIN)/python bench/batch.py

clean:
	rm -rf out $(VENV)
