# make demo | make test | make bench: each installs what it needs first.
# make test-torch TORCH=X: CPU build + pytest against torch==X in its own venv.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
# The supported range (pyproject.toml): CI tests both ends, and the torch and
# transformers of the lent H100's image, where Dynamo behaves unlike at either end.
TORCH_OLDEST ?= 2.6.0
TORCH_NEWEST ?= 2.15.0
TORCH_GPU_HOST ?= 2.11.0
TRANSFORMERS_GPU_HOST ?= 5.17.0
TORCH ?= $(TORCH_NEWEST)
TORCH_DIR := build/torch-$(TORCH)
TEST_PACKAGES := pytest pytest-timeout pytest-xdist numpy expecttest hypothesis
# pytest worker processes (pytest-xdist): the suite is mostly single-threaded
# Dynamo compilation, so 2 workers on 2 cores halve its time (4m44s -> 2m31s).
PYTEST_WORKERS ?= 2
# transformers==VENV_TRANSFORMERS in the torch-X venv too (empty: none; the
# Hugging Face tests then skip).
VENV_TRANSFORMERS ?=
TRANSFORMERS_VERSION ?= 5.24.0
BUILD_CPP ?= build-cpp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := cmake ninja-build ccache libgtest-dev libbenchmark-dev
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

export PATH := /usr/lib/ccache:$(PATH)
export MAX_JOBS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: all deps apt-deps install test test-python test-cpp test-torch test-torch-range torch-venv demo bench bench-cuda bench-smoke clean

all: install

# System packages and Python packages, each only when missing. torch comes
# from the wheel on disk (pip's find-links); it is never a build requirement.
# Builds run without build isolation, so setuptools must be new enough here.
deps: apt-deps
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import pytest, pytest_timeout, xdist, numpy, expecttest, hypothesis, matplotlib" 2>/dev/null || \
	  $(PYTHON) -m pip install -q $(TEST_PACKAGES) matplotlib
	@# Hugging Face parity tests (tests/test_hf*.py) compare with this exact release.
	@$(PYTHON) -c "import transformers; assert transformers.__version__ == '$(TRANSFORMERS_VERSION)'" \
	  2>/dev/null || $(PYTHON) -m pip install -q "transformers==$(TRANSFORMERS_VERSION)"
	@$(PYTHON) -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
	  2>/dev/null || $(PYTHON) -m pip install -q "setuptools>=77" wheel

apt-deps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES))

# The extension, rebuilt when a source changes.
build/.installed: $(SOURCES)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

install: deps build/.installed

$(BUILD_CPP)/build.ninja: CMakeLists.txt
	cmake -S . -B $(BUILD_CPP) -G Ninja -DPython3_EXECUTABLE=$$(command -v $(PYTHON))

test-python: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS)

test-cpp: deps $(BUILD_CPP)/build.ninja
	cmake --build $(BUILD_CPP) -j $(MAX_JOBS)
	ctest --test-dir $(BUILD_CPP) --output-on-failure

test: test-python test-cpp

# Another torch, in a venv of its own: torch==$(TORCH) from PyPI, a CPU-only
# build into $(TORCH_DIR)/lib (never the source tree: the main build's
# moe_routing/_C*.so stays as it is), then the whole pytest suite with that
# folder first on the path. It stops if any other _C.so would be loaded.
torch-venv: $(TORCH_DIR)/venv/.ready

# --no-cache-dir: pip would otherwise keep a second copy of several GB of
# wheels per venv, and hold each large download in memory while caching it.
$(TORCH_DIR)/venv/.ready:
	rm -rf $(TORCH_DIR)/venv
	$(PYTHON) -m venv $(TORCH_DIR)/venv
	$(TORCH_DIR)/venv/bin/python -m pip install -q --no-cache-dir "torch==$(TORCH)" $(TEST_PACKAGES) "setuptools>=77" wheel \
	  $(if $(VENV_TRANSFORMERS),"transformers==$(VENV_TRANSFORMERS)")
	touch $@

# It builds in place in a copy of the tree (build/torch-X/src), so that the
# test processes, and the processes they spawn, import that build and never
# the source tree's extension.
test-torch: apt-deps $(TORCH_DIR)/venv/.ready
	rm -rf $(TORCH_DIR)/src && mkdir -p $(TORCH_DIR)/src
	tar -cf - --exclude=./build --exclude=./build-cpp --exclude=./demo_out --exclude=./.git \
	  --exclude='*.so' --exclude='*.egg-info' . | tar -xf - -C $(TORCH_DIR)/src
	cd $(TORCH_DIR)/src && MOE_ROUTING_CUDA=0 ../venv/bin/python setup.py -q build_ext --inplace
	cd $(TORCH_DIR)/src && ../venv/bin/python -c \
	  "import sys, os, torch, moe_routing; so = moe_routing._C.__file__; \
	  print('torch', torch.__version__, 'extension', so); \
	  assert torch.__version__.split('+')[0] == sys.argv[1], torch.__version__; \
	  assert so.startswith(os.getcwd() + '/'), so" $(TORCH)
	cd $(TORCH_DIR)/src && ../venv/bin/python -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider

test-torch-range:
	$(MAKE) test-torch TORCH=$(TORCH_OLDEST)
	$(MAKE) test-torch TORCH=$(TORCH_NEWEST)

demo: install
	$(PYTHON) examples/train_lm.py

bench: install
	$(PYTHON) benchmarks/bench.py

bench-cuda: install
	$(PYTHON) benchmarks/bench.py --device cuda

bench-smoke: install
	$(PYTHON) benchmarks/bench.py --smoke --out build/bench-smoke.md

print-%:
	@echo $($*)

clean:
	rm -rf build $(BUILD_CPP) demo_out moe_routing/*.so *.egg-info
