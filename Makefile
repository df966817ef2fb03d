# The two commands of README.md:
#   make demo   install what is missing, build (Release), run a real job over samples/
#   make test   install what is missing, build, run every test through ctest
#
# Dependencies come from Debian packages only; `deps` installs the missing ones with apt-get
# (through sudo when not root). The interop tests additionally use the real `safetensors`
# and `numpy` Python packages from PyPI in a virtualenv under the build directory; when they
# cannot be installed (an offline machine) those tests say so and skip.

BUILD_DIR ?= build
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PACKAGES  := cmake make g++ libeigen3-dev liblapacke-dev libopenblas-dev libcli11-dev libfmt-dev \
             catch2 nlohmann-json3-dev python3 python3-venv
VENV      := $(BUILD_DIR)/venv
PYPI_PACKAGES := safetensors numpy gguf

.PHONY: demo test deps build interop-env install package clean

deps:
	@missing=""; \
	for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing missing packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build: deps
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	cmake --build $(BUILD_DIR) -j $(JOBS)

# Best effort: the interop tests skip visibly when this fails (CI requires it to work).
interop-env: deps
	@if [ ! -x $(VENV)/bin/python ] || ! $(VENV)/bin/python -c "import safetensors, numpy, gguf" 2>/dev/null; then \
	  echo "setting up $(VENV) with $(PYPI_PACKAGES) for the interop tests"; \
	  ( /usr/bin/python3 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV) ) && \
	  $(VENV)/bin/python -m pip install -q --disable-pip-version-check --timeout 30 $(PYPI_PACKAGES) \
	  || echo "warning: could not install $(PYPI_PACKAGES); the interop tests will be skipped"; \
	fi

test: build interop-env
	cd $(BUILD_DIR) && LORAKIT_PYTHON=$(abspath $(VENV))/bin/python ctest --output-on-failure -j $(JOBS)

demo: build
	@echo
	@echo "== lora-inspect over the sample adapters (one per key convention) =="
	$(BUILD_DIR)/bin/lora-inspect samples/peft-llama samples/kohya-sdxl.safetensors samples/diffusers-sd15.safetensors \
	  samples/mlx-qwen samples/cloneofsimo-sd15.safetensors
	@echo
	@echo "== per-module table of the kohya sample =="
	$(BUILD_DIR)/bin/lora-inspect --modules samples/kohya-sdxl.safetensors
	@echo
	@echo "== the PEFT report as JSON (first 40 lines) =="
	$(BUILD_DIR)/bin/lora-inspect --json samples/peft-llama | head -n 40
	@echo
	@echo "== lora-resize: the PEFT sample to rank 2 (into $(BUILD_DIR)/demo) =="
	@mkdir -p $(BUILD_DIR)/demo
	$(BUILD_DIR)/bin/lora-resize samples/peft-llama -o $(BUILD_DIR)/demo/peft-llama-r2 --rank 2 --force
	@echo
	@echo "== lora-merge: the kohya sample with itself at 0.7 and -0.2, svd to rank 4 =="
	$(BUILD_DIR)/bin/lora-merge samples/kohya-sdxl.safetensors samples/kohya-sdxl.safetensors --weights 0.7,-0.2 \
	  --method svd --rank 4 -o $(BUILD_DIR)/demo/kohya-merged.safetensors --force
	$(BUILD_DIR)/bin/lora-inspect $(BUILD_DIR)/demo/kohya-merged.safetensors
	@echo
	@echo "== lora-stack: the PEFT sample with its rank-2 resize (nearly the same adapter: strength adds up) =="
	$(BUILD_DIR)/bin/lora-stack samples/peft-llama:0.8 $(BUILD_DIR)/demo/peft-llama-r2:0.8 --top 5
	$(BUILD_DIR)/bin/lora-stack samples/peft-llama:0.8 $(BUILD_DIR)/demo/peft-llama-r2:0.8 --top 5 --auto-scale \
	  -o $(BUILD_DIR)/demo/peft-llama-stacked --force
	@echo
	@echo "== lora-stack against the tiny base model, then lora-bake the stack into it =="
	$(BUILD_DIR)/bin/lora-stack samples/peft-llama:0.8 $(BUILD_DIR)/demo/peft-llama-r2:0.5 --base samples/base-llama --top 3
	$(BUILD_DIR)/bin/lora-bake samples/base-llama samples/peft-llama:0.8 $(BUILD_DIR)/demo/peft-llama-r2:0.5 \
	  -o $(BUILD_DIR)/demo/base-llama-baked.safetensors --force
	@echo
	@echo "== lora-extract: the baked difference back as a rank-8 PEFT adapter (the F16 base rounds it: see the error column) =="
	$(BUILD_DIR)/bin/lora-extract samples/base-llama $(BUILD_DIR)/demo/base-llama-baked.safetensors --rank 8 \
	  -o $(BUILD_DIR)/demo/peft-llama-extracted --force
	@echo
	@echo "== lora-convert: the PEFT sample to a llama.cpp GGUF adapter (head counts from the base's config.json) =="
	$(BUILD_DIR)/bin/lora-convert samples/peft-llama --to gguf --base samples/base-llama/config.json \
	  -o $(BUILD_DIR)/demo/peft-llama.gguf --force
	$(BUILD_DIR)/bin/lora-inspect $(BUILD_DIR)/demo/peft-llama.gguf
	@echo
	@echo "== samples/pipeline: a Makefile batch job (convert, resize, stack check, merge, bake, extract, compare) =="
	$(MAKE) --no-print-directory -C samples/pipeline -j2 LORAKIT=$(abspath $(BUILD_DIR))/bin OUT=$(abspath $(BUILD_DIR))/pipeline

# The tools, the library, headers, CMake package, pkg-config file, man pages and bash completion.
PREFIX ?= /usr/local
install: build
	cmake --install $(BUILD_DIR) --prefix $(PREFIX)

# A Debian package (build/lorakit_<version>_<arch>.deb).
package: build
	cd $(BUILD_DIR) && cpack -G DEB

clean:
	rm -rf $(BUILD_DIR)
