# make train / make test: each creates .venv/ and installs into it on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Where torch comes from. For a CUDA build of your choice, e.g.:
#   make install TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Tests run in parallel processes of one thread each (pytest-xdist): on 2 cores two one-thread workers finish the
# suite in about half the time of one two-thread process, whose small tensor ops scale poorly across threads.
TEST_WORKERS ?= auto
# the compiled recurrence's tests compare it with the Python loops wherever it was built (CI requires it: .ci/run)
CAPTIONING_REQUIRE_KERNELS ?= $$(grep -qx built $(VENV)/.kernels 2>/dev/null && echo 1 || echo 0)
TEST_ENV := WANDB_MODE=offline OMP_NUM_THREADS=1 CAPTIONING_REQUIRE_KERNELS=$(CAPTIONING_REQUIRE_KERNELS)

.PHONY: install train test test-fast test-slow bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,sweeps,demo,export,plots,hf,timm,clip]"
	touch $@

# the recurrent cores' loops compiled once (~20 s; C++ compiler and ninja); without them the same math runs in
# Python loops, slower at small sizes, so a failed build only warns
$(VENV)/.kernels: $(VENV)/.installed src/captioning/models/csrc/recurrence.cpp src/captioning/models/kernels.py
	if $(PY) -m captioning.models.kernels; then echo built > $@; else echo "not built" > $@; fi

install: $(VENV)/.installed $(VENV)/.kernels

## train on the built-in data set (pass overrides with ARGS="model=attention trainer.max_epochs=5")
train: install
	$(PY) src/train.py $(ARGS)

## the whole test suite: fast tests, then the slow end-to-end, DDP and sweep tests
test: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

bench: install
	$(PY) benchmarks/run_all.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
