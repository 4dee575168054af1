# forja: `make demo` runs the whole pipeline on the bundled site; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
WORKDIR ?= work
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install system-deps demo serve test test-fast bench clean help

help:
	@echo "make demo     install, then run the pipeline on configs/demo.yaml (crawl -> register), then fine-tune"
	@echo "make serve    serve the champion of MODEL (default forja-demo) on http://127.0.0.1:5001/invocations"
	@echo "make test     install, then run the test suite"
	@echo "make install  create $(VENV) and install forja with its test tools"
	@echo "make bench    run the benchmarks in benchmarks/"
	@echo "make clean    remove the work directory ($(WORKDIR))"

install: $(STAMP)

# torch first, pinned to the CPU build: otherwise DeepSpeed's requirements pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests talk to: a real redis-server (the dedupe index on Redis).
system-deps:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server; \
	  else sudo apt-get update -q && sudo apt-get install -y -q redis-server; fi; }

demo: install
	$(BIN)/forja run configs/demo.yaml --workdir $(WORKDIR)
	$(BIN)/forja finetune configs/demo.yaml --workdir $(WORKDIR)

# Real-time serving of the champion on 127.0.0.1:5001 (mlflow starts uvicorn from PATH).
serve: install
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=sqlite:///$(abspath $(WORKDIR))/mlflow.db \
	  $(BIN)/mlflow models serve -m models:/$${MODEL:-forja-demo}@champion --env-manager local -h 127.0.0.1 -p 5001 -w 1

test: install system-deps
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -v

test-fast: install system-deps
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -v -m "not slow"

bench: install
	$(BIN)/python benchmarks/dedupe.py
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/loader.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/train.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/quality.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(WORKDIR)
