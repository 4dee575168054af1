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
# The service stack (make up): ports, database (DB=sqlite|postgres, or DATABASE_URL=postgresql://...)
# and how long it may take to become healthy; flows/stack.py reads them from the environment.
# DB empty: SQLite, or the PostgreSQL this work directory's stack used last time.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PG_PORT ?=
DB ?=
STACK_TIMEOUT ?= 120
SERVE_PORT ?= 5001
STACK_ENV = PATH=$(CURDIR)/$(BIN):$$PATH FORJA_WORKDIR=$(abspath $(WORKDIR)) PREFECT_PORT=$(PREFECT_PORT) \
  MLFLOW_PORT=$(MLFLOW_PORT) PG_PORT=$(PG_PORT) DB=$(DB) STACK_TIMEOUT=$(STACK_TIMEOUT)
# Debian packages: redis-server (dedupe index), chromium + chromium-driver (UI tests),
# docker-compose (compose file check), postgresql (a private PostgreSQL cluster), and for the
# two-node training test (two network namespaces on this machine): iproute2, openssh-server, pdsh.
SYSTEM_DEPS := redis-server:/usr/bin/redis-server chromium:/usr/bin/chromium \
  chromium-driver:/usr/bin/chromedriver docker-compose:/usr/bin/docker-compose \
  postgresql:/usr/lib/postgresql/15/bin/initdb iproute2:/usr/sbin/ip openssh-client:/usr/bin/ssh openssh-server:/usr/sbin/sshd \
  pdsh:/usr/bin/pdsh

.PHONY: install system-deps demo serve chat test test-fast bench clean help up down status

help:
	@echo "make demo     install, then run the pipeline on configs/demo.yaml (crawl -> register), then fine-tune"
	@echo "make serve    serve the champion of MODEL (default forja-demo) on http://127.0.0.1:$(SERVE_PORT)/invocations"
	@echo "make chat     forja serve: chat page and OpenAI-compatible API of MODEL_URI (default models:/forja-demo-faq@champion) on http://127.0.0.1:8000/"
	@echo "make test     install, then run the test suite"
	@echo "make install  create $(VENV) and install forja with its test tools"
	@echo "make bench    run the benchmarks in benchmarks/"
	@echo "make up       start the service: Prefect server + worker + deployments, MLflow server (DB=postgres for PostgreSQL)"
	@echo "make down     stop what make up started (the data under $(WORKDIR)/service is kept)"
	@echo "make status   what the service runs and whether it answers"
	@echo "make clean    remove the work directory ($(WORKDIR))"

install: $(STAMP)

# torch first, pinned to the CPU build: otherwise DeepSpeed's requirements pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests talk to (SYSTEM_DEPS: package:file it provides), installed when missing.
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do test -e "$${dep#*:}" || missing="$$missing $${dep%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; fi

# The service on this machine (flows/stack.py): data, logs and pid files under $(WORKDIR)/service.
up: install
	@$(STACK_ENV) $(BIN)/python -m flows.stack up

down:
	@$(STACK_ENV) $(BIN)/python -m flows.stack down

status:
	@$(STACK_ENV) $(BIN)/python -m flows.stack status

demo: install
	$(BIN)/forja run configs/demo.yaml --workdir $(WORKDIR)
	$(BIN)/forja finetune configs/demo.yaml --workdir $(WORKDIR)

# Real-time serving of the champion on 127.0.0.1:$(SERVE_PORT) (mlflow starts uvicorn from PATH), from
# MLFLOW_TRACKING_URI when set (the tracking server of make up: http://127.0.0.1:5000), else work/mlflow.db.
serve: install
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath $(WORKDIR))/mlflow.db} \
	  $(BIN)/mlflow models serve -m models:/$${MODEL:-forja-demo}@champion --env-manager local -h 127.0.0.1 -p $(SERVE_PORT) -w 1

chat: install    # forja serve: the OpenAI-compatible API and the chat page on 127.0.0.1:8000
	$(BIN)/forja serve $${MODEL_URI:-models:/forja-demo-faq@champion} --workdir $(WORKDIR)

test: install system-deps
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -v --durations=25

test-fast: install system-deps
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -v -m "not slow"

bench: install
	$(BIN)/python benchmarks/dedupe.py
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/loader.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/train.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/quality.py
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/pii.py
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf $(WORKDIR)
