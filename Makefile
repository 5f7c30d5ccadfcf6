# brainrobust: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= probe.sensitivity.max_images=8
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (see README).
	$(BIN)/pip install -e '.[dev]'
	# torchattacks and robustness are test-only references; their own pins would pull another torch.
	$(BIN)/pip install --no-deps 'torchattacks==3.5.1' 'robustness==1.2.1.post2'
	touch $(STAMP)

install: $(STAMP)

# A first look: the default run on 8 of the twin's 80 test images (all 80: python run.py).
demo: install
	$(BIN)/python run.py $(DEMO)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check brainrobust tests run.py benchmarks experiments

bench: install
	$(BIN)/python benchmarks/run_all.py

figures: install
	bash experiments/synthetic_study.sh results/synthetic_study figures

clean:
	rm -rf outputs multirun .pytest_cache
