# Two commands on a fresh clone:  `make demo` (install + main job)  and  `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
BENCH_ARGS ?=
BIN    := $(VENV)/bin

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	@# a second `make demo` resumes the finished sweep (nothing reruns) and rewrites the report
	$(BIN)/harness sweep search_spaces/quickstart.yaml --name quickstart-demo \
	    $$([ -d ray_results/quickstart-demo ] && echo --resume)
	$(BIN)/harness report --experiment quickstart-demo --out reports/quickstart-demo
	@echo "report: $(CURDIR)/reports/quickstart-demo/index.md"

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs ray_results .pytest_cache reports/quickstart-demo
