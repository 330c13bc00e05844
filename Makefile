# Two commands for a fresh clone: `make demo` and `make test`. Both install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

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
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf $(WORKDIR)
