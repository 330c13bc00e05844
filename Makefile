# Two commands for a fresh clone: `make demo` and `make test`. Both install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# Test processes (pytest-xdist). Run one at a time, the suite's long tests leave a core idle about 40% of the
# time (waiting on child runs, single-threaded compilers, disk); two workers keep both cores of a small CI
# machine busy. Each test file stays in one worker (--dist loadfile), so its module fixtures (the end-to-end
# runs) are built once. TEST_WORKERS=0 runs the tests in pytest's own process.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast install clean-demo

$(VENV)/.installed-sample: pyproject.toml setup.py dailymae_jax/data/_jpeg_crop.c dailymae_jax/data/_jpeg_index.c dailymae_jax/data/_jpeg_index.h tools/setup_env.sh
	bash tools/setup_env.sh $(VENV) sample
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py dailymae_jax/data/_jpeg_crop.c dailymae_jax/data/_jpeg_index.c dailymae_jax/data/_jpeg_index.h tools/setup_env.sh
	bash tools/setup_env.sh $(VENV) test
	touch $@ $(VENV)/.installed-sample

install: $(VENV)/.installed-sample

demo: $(VENV)/.installed-sample
	$(PY) -m dailymae_jax.main --config=configs/mae_demo.py --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PYTEST)

test-fast: $(VENV)/.installed-test
	$(PYTEST) -m "not slow"

clean-demo:
	rm -rf $(WORKDIR)

# The crop-decode kernel under AddressSanitizer and UndefinedBehaviorSanitizer, over FUZZ_COUNT mutated JPEGs
# (make test runs 5,000). FUZZ_SEED picks other mutations; a report prints the command that replays its case.
FUZZ_COUNT ?= 100000
FUZZ_SEED ?= 1
.PHONY: fuzz
fuzz: $(VENV)/.installed-sample
	$(PY) tools/fuzz_kernel.py --count $(FUZZ_COUNT) --seed $(FUZZ_SEED)
