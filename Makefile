# The README's two commands: `make study` (the default study end to end) and `make test`.
# Both set everything up on a fresh machine: the Debian Fashion-MNIST package and a venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STUDY   ?= update_ops
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup study test test-fast report ui bench clean-runs

setup: $(VENV)/.installed $(DATASET)

$(DATASET):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# constraints.txt pins the tested versions (torch 2.13.0: the CPU build, never a CUDA one).
	$(BIN)/pip install -q -c constraints.txt -e '.[test,cluster]'
	touch $@

study: setup  ## the default study on the real Fashion-MNIST, then its figures in results/
	$(BIN)/bnlab-train study=$(STUDY)
	$(BIN)/bnlab-report study=$(STUDY)

# Everything (what CI runs), on TEST_WORKERS pytest-xdist workers (one more than the CPUs: the
# cluster tests spend much of their time waiting on SLURM and servers), with the 15 slowest tests
# listed. TEST_WORKERS=0 runs the suite in this one process. pytest's exit 5 (no test collected)
# fails too, with a line that says so.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# In-process tests only: no real data, no torch.compile, no console-script or server processes.
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 -m "not slow and not subprocess and not cluster"

report: setup
	$(BIN)/bnlab-report

ui: setup
	$(BIN)/bnlab-ui

bench: setup
	$(BIN)/python benchmarks/bench_train.py

clean-runs:  ## deletes the local MLflow store and Hydra job folders (runs/)
	rm -rf runs
