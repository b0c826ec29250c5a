# make demo | make test | make bench: each installs what it needs first.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
BUILD_CPP ?= build-cpp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := cmake ninja-build ccache libgtest-dev libbenchmark-dev
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

export PATH := /usr/lib/ccache:$(PATH)
export MAX_JOBS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: all deps install test test-python test-cpp demo bench bench-smoke clean

all: install

# System packages and Python packages, each only when missing. torch comes
# from the wheel on disk (pip's find-links); it is never a build requirement.
deps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES))
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import pytest, numpy, expecttest, matplotlib" 2>/dev/null || \
	  $(PYTHON) -m pip install -q pytest numpy expecttest matplotlib

# The extension, rebuilt when a source changes.
build/.installed: $(SOURCES)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

install: deps build/.installed

$(BUILD_CPP)/build.ninja: CMakeLists.txt
	cmake -S . -B $(BUILD_CPP) -G Ninja -DPython3_EXECUTABLE=$$(command -v $(PYTHON))

test-python: install
	$(PYTHON) -m pytest -q

test-cpp: deps $(BUILD_CPP)/build.ninja
	cmake --build $(BUILD_CPP) -j $(MAX_JOBS)
	ctest --test-dir $(BUILD_CPP) --output-on-failure

test: test-python test-cpp

demo: install
	$(PYTHON) examples/train_lm.py

bench: install
	$(PYTHON) benchmarks/bench.py

bench-smoke: install
	$(PYTHON) benchmarks/bench.py --smoke --out build/bench-smoke.md

clean:
	rm -rf build $(BUILD_CPP) demo_out moe_routing/*.so *.egg-info
