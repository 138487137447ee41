# Two commands matter: `make train` and `make test`. Both create .venv on first use.
# GPU users: make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,triton,liger
STAMP      := $(VENV)/.twinkle-installed

.PHONY: setup train test bench env clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The main job runs under torchrun on NPROC ranks (gloo on CPU, nccl/hccl on accelerators) with
# expert parallelism over all of them; NPROC=1 runs it in one plain process.
NPROC      ?= 2
LAUNCH     := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))

train: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/train.py

# pytest exits 5 when it collects no test: make fails then, as it does on any failure.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run.py $(if $(QUICK),--quick) $(if $(FULL),--full)
	$(PY) benchmarks/bench_packing.py $(if $(QUICK),--quick)
	$(PY) benchmarks/bench_expert_parallel.py $(if $(QUICK),--quick)

env: setup
	$(PY) -m twinkle env

clean:
	rm -rf $(VENV) build *.egg-info
