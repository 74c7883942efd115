# Two commands: `make demo` (install + end-to-end run on CPU) and `make test` (install + test suite).
# And the GPU check, in two steps (benchmarks/gpu_check.py; README "GPU check"):
#   make wheelhouse   on a machine with network: dist/wheelhouse/ = the project's wheel + every wheel
#                     that a stock PyTorch GPU image (CPython 3.12) lacks for the check
#                     (benchmarks/gpu_check_wheels.txt), at most 64 MiB, one version of each
#   make gpu-check    on the CUDA machine, no network, no venv: installs dist/wheelhouse/*.whl into
#                     $(GPU_SITE) with pip --no-index --no-deps --target and runs the check with that
#                     folder on PYTHONPATH (VAE, encode, LDM, generate, evaluate on one GPU; a JSON line last).
#   One line for a machine without make (the same two steps):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       dist/wheelhouse/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: a CPU build on this machine; on a GPU cluster override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

WHEELHOUSE ?= dist/wheelhouse
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/scldm-gpu-site

.PHONY: demo test install clean wheelhouse gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[dev,report]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scldm-scale demo --out runs/demo --strict

test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

wheelhouse: $(STAMP)
	$(PY) benchmarks/wheelhouse.py build --out $(WHEELHOUSE)

# No venv here: the machine's own python (a stock PyTorch) plus the wheelhouse on PYTHONPATH.
gpu-check:
	@test -n "$(wildcard $(WHEELHOUSE)/*.whl)" || { echo "error: no wheels in $(WHEELHOUSE); run make wheelhouse on a machine with network first" >&2; exit 2; }
	rm -rf $(GPU_SITE)
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(WHEELHOUSE)/*.whl
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache
