# Two commands matter: `make train` and `make test`. Both create .venv on first use.
# GPU users: make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,triton,liger,megatron,ray,server
STAMP      := $(VENV)/.twinkle-installed
# The versions the suite passed with (constraints.txt); UPGRADE=1 installs the newest releases instead,
# to find drift on purpose (make test-latest), and `make lock` records them once the suite passes.
# GPU users whose torch build needs other versions (nvidia-*, triton) pass PIN= to install without them.
PIN        ?= constraints.txt
PIP        := PIP_CONSTRAINT=$(if $(UPGRADE),,$(PIN)) $(PY) -m pip install -q
PIP_UPGRADE := $(if $(UPGRADE),--upgrade --upgrade-strategy eager,)

.PHONY: setup train test test-quick test-latest lock bench gpu-check env clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
# PIP_CONSTRAINT (not -c) so that pip's isolated build environments get the pins too (setuptools, wheel).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(PIP_UPGRADE) pip setuptools wheel
	$(PIP) $(TORCH_SPEC)
	$(PIP) $(PIP_UPGRADE) -e ".[$(EXTRAS)]"
	$(if $(UPGRADE),rm -f $@,touch $@)

# The main job runs under torchrun on NPROC ranks (gloo on CPU, nccl/hccl on accelerators) with
# expert parallelism over all of them; NPROC=1 runs it in one plain process.
NPROC      ?= 2
LAUNCH     := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))

# CP_SIZE / ULYSSES_SIZE (context parallelism): examples/long_context.py instead, the tiny Qwen3 on 4k-token
# sequences split over cp x ulysses ranks (NPROC must be a multiple of their product), peak memory per rank.
CP_SIZE      ?=
ULYSSES_SIZE ?=

# BACKEND=megatron: examples/megatron.py (MegatronModel) on the tiny Qwen3-MoE, then the tiny Qwen3
# (NPROC=4: tp=2 x ep=2, then tp=2 x pp=2).
BACKEND    ?= transformers

# MODE=ray: examples/ray_sft.py, the SFT example on a local Ray cluster (2 CPU actors; RAY_ADDRESS joins a
# running one); examples/sft.py is the same script for torchrun.
MODE       ?= local

# JOB=grpo: examples/grpo.py, GRPO with TorchSampler: under torchrun the last rank samples and the others
# train (weights synced over gloo/NCCL); NPROC=1 runs model and sampler in one process.
JOB        ?= sft

train: setup
ifeq ($(MODE),ray)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) examples/ray_sft.py
else ifeq ($(JOB),grpo)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/grpo.py
else ifneq ($(CP_SIZE)$(ULYSSES_SIZE),)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/long_context.py \
		$(if $(CP_SIZE),--cp-size $(CP_SIZE)) $(if $(ULYSSES_SIZE),--ulysses-size $(ULYSSES_SIZE))
else ifeq ($(BACKEND),megatron)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/megatron.py --model qwen3_moe
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/megatron.py --model qwen3
else
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LAUNCH) examples/train.py
endif

# pytest exits 5 when it collects no test: make fails then, as it does on any failure.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

# Everything but the end-to-end jobs marked slow (a few minutes instead of the whole suite).
test-quick: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

# The newest releases of every dependency (torch stays TORCH_SPEC's), then the whole suite.
test-latest:
	$(MAKE) setup UPGRADE=1
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

lock: setup
	{ sed -n 1,2p constraints.txt; $(PY) -m pip freeze --all --exclude-editable | grep -iv '^twinkle' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

bench: setup
	$(PY) benchmarks/run.py $(if $(QUICK),--quick) $(if $(FULL),--full)
	$(PY) benchmarks/bench_packing.py $(if $(QUICK),--quick)
	$(PY) benchmarks/bench_expert_parallel.py $(if $(QUICK),--quick)
	$(PY) benchmarks/bench_megatron_memory.py $(if $(QUICK),--quick)

# On a CUDA machine, under 8 minutes: the kernel tests with Triton compiled (fp32, bf16, fp16), the kernel
# benchmarks on the GPU, then benchmarks/results/gpu-check/cuda-<gpu>.{json,md}. Elsewhere: says so, exit 2.
# `make gpu-check PY=python3` uses that interpreter's torch/triton as they are (a GPU image with no package
# registry): no .venv, the checkout on PYTHONPATH.
gpu-check: $(if $(filter command line,$(origin PY)),,setup)
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/gpu_check.py

env: setup
	$(PY) -m twinkle env

clean:
	rm -rf $(VENV) build *.egg-info
