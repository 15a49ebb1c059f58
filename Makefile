# segflow: two entry points, `make demo` and `make test`. Each creates the environment if missing.
#
# The environment is ~6 GB (torch), so it lives in a cache keyed by the exact pins in
# requirements.lock and is linked as .venv: a fresh clone with unchanged pins reuses it.
PYTHON      ?= python3.11
VENV_CACHE  ?= $(HOME)/.cache/segflow/venvs
LOCK_KEY    := $(shell cat requirements.lock | sha256sum | cut -c1-16)
VENV_DIR    := $(VENV_CACHE)/py311-$(LOCK_KEY)
VENV        := .venv
BIN         := $(VENV)/bin
DEMO_DIR    ?= demo-out

.PHONY: env demo test lint format bench clean cluster-demo

env: $(VENV_DIR)/.complete
	@ln -sfn "$(VENV_DIR)" $(VENV)
	@# The cached env is shared between clones, so the editable install must point at *this*
	@# checkout: reinstall (a few seconds) whenever segflow, or its flows/ (segflow.flows, a
	@# package-dir mapping an older install lacks), resolves somewhere else.
	@$(BIN)/python -c "import segflow.flows, pathlib, sys; sys.exit(pathlib.Path(segflow.__file__).resolve().parent != pathlib.Path('src/segflow').resolve() or pathlib.Path(segflow.flows.__file__).resolve().parent != pathlib.Path('flows').resolve())" 2>/dev/null \
		|| $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .

# Built in place; .complete is written last, so an interrupted build is redone from scratch.
# No prerequisite on requirements.lock: the pins' hash is in the folder name already, and a
# fresh clone's newer file time must not trigger a rebuild of a cached environment.
$(VENV_DIR)/.complete:
	@echo ">> building environment $(VENV_DIR) (one-off, a few minutes)"
	rm -rf "$(VENV_DIR)"
	mkdir -p "$(VENV_CACHE)"
	$(PYTHON) -m venv "$(VENV_DIR)"
	"$(VENV_DIR)/bin/python" -m pip install -q --upgrade pip setuptools
	"$(VENV_DIR)/bin/python" -m pip install -q -r requirements.lock
	touch "$@"

demo: env
	bash scripts/demo.sh "$(DEMO_DIR)"

# The production path on one machine, each part its own process: S3 (moto), Prefect server +
# worker + deployments, a Ray head and two GPU-declaring Ray nodes, Dask scheduler + 2 workers,
# with a node kill and a worker kill (docs/cluster.md). Last line: a JSON summary.
cluster-demo: env
	bash scripts/cluster_demo.sh

test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	bash scripts/check_prefect_server.sh
	$(BIN)/python -m pytest

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every CPU benchmark, each keeping its stdout (its JSON report last) in $(BENCH_OUT), then the
# figures block of docs/results.md rewritten from those reports. FAST=1: one repeat and small
# loads (about 15 minutes on 2 cores instead of an hour, noisier). BENCH_NOTE="...": a line
# printed above the table, e.g. that other jobs shared the machine. A benchmark that fails is
# marked in the table; the others still run. The real images come from ../shared/data, or from
# SEGFLOW_BENCH_DATA (a folder holding isic2017/) when the checkout lives elsewhere.
BENCH_OUT  ?= benchmarks/results
BENCHMARKS := ingest crops predict train serve
BENCH_ARGS_ingest  = $(if $(FAST),--repeats 1,--repeats 3 --memory)
BENCH_ARGS_crops   = $(if $(FAST),--repeats 1,--repeats 3)
BENCH_ARGS_predict = $(if $(FAST),--repeats 1 --train-n 16,--repeats 2 --memory 2000)
BENCH_ARGS_train   = $(if $(FAST),--repeats 1 --steps 8 --n 64,--repeats 2)
BENCH_ARGS_serve   = $(if $(FAST),--clients 2 --requests 4 --train-n 16,)

bench: env
	@mkdir -p $(BENCH_OUT)
	@$(foreach b,$(BENCHMARKS),echo ">> benchmarks/$(b).py --json $(BENCH_ARGS_$(b))"; \
		$(BIN)/python benchmarks/$(b).py --json $(BENCH_ARGS_$(b)) > $(BENCH_OUT)/$(b).out \
			|| echo "{\"failed\": \"exit code $$?\"}" >> $(BENCH_OUT)/$(b).out; \
		cat $(BENCH_OUT)/$(b).out;)
	$(BIN)/python scripts/render_results.py $(BENCH_OUT) --doc docs/results.md \
		--mode $(if $(FAST),fast,full) $(if $(BENCH_NOTE),--note "$(BENCH_NOTE)")

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
