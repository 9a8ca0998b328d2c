# Two commands for a fresh machine (CPU is enough):
#   make demo   # end-to-end demo on the embedded tiny model (creates .venv on first use)
#   make test   # the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
REQ_HASH := $(shell cksum requirements.txt | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: setup demo test lint bench quickstart clean

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/python demo.py

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python bench/bench_mi_attention.py
	$(VENV)/bin/python bench/bench_prepare_data.py
	$(VENV)/bin/python bench/bench_training.py
	$(VENV)/bin/python bench/bench_extraction.py
	$(VENV)/bin/python bench/bench_evaluation.py
	$(VENV)/bin/python bench/bench_full_size.py train --count --json outputs/bench_full_size/count.json
	$(VENV)/bin/python bench/bench_full_size.py encoders --json outputs/bench_full_size/encoders.json
	bash bench/gpu_check.sh --dry_run

quickstart:
	bash quickstart_lora_training.sh

clean:
	rm -rf demo_output .pytest_cache
