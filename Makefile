# Everything a fresh machine needs goes through scripts/setup.sh (idempotent, re-run when setup.py changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# DeepSpeed JIT-compiles small C++ ops on first use: keep them in a persistent, project-owned cache.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dsl-diffusion/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
# Everything the tests and the demo use is on disk; without this, a GPT-2 tokenizer lookup retries the Hub for ~50 s.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench clean

$(STAMP): setup.py scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsl-demo

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py --compile

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
