# recship set-up. `make demo` and `make test` create .venv if missing and install everything.
# The install is idempotent: a stamp file records what was installed and is redone only when
# constraints.txt, pyproject.toml, setup.py, the .proto files or this Makefile change.
#
# ACCEL picks the builds of fbgemm_gpu and faiss: cpu (fbgemm-gpu-cpu, faiss-cpu) or cuda
# (fbgemm-gpu, faiss-gpu). Default: cuda where `nvidia-smi -L` lists a GPU, cpu otherwise.
# Override with `make test ACCEL=cpu`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
ACCEL ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
PIP = $(VENV)/bin/python -m pip
PIP_INSTALL = $(PIP) install --quiet --disable-pip-version-check -c constraints.txt
STAMP = $(VENV)/.installed-$(ACCEL)
INSTALL_INPUTS = constraints.txt pyproject.toml setup.py Makefile $(wildcard protos/recship/v1/*.proto)

ACCEL_PACKAGES_cpu = fbgemm-gpu-cpu faiss-cpu
ACCEL_PACKAGES_cuda = fbgemm-gpu faiss-gpu
ifeq ($(filter $(ACCEL),cpu cuda),)
$(error ACCEL must be cpu or cuda, not '$(ACCEL)')
endif

.PHONY: install demo test lint clean gpu-check

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel grpcio-tools
	$(PIP_INSTALL) torch $(ACCEL_PACKAGES_$(ACCEL)) tensordict torchmetrics pyre-extensions tqdm
	@# torchrec's metadata requires the CUDA fbgemm-gpu even on CPU hosts: install it alone.
	$(PIP_INSTALL) --no-deps torchrec
	$(PIP_INSTALL) --no-build-isolation -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "recship installed in $(VENV) ($(ACCEL) build)"

demo: install
	$(VENV)/bin/recship demo

test: install
	$(VENV)/bin/python -m pytest

# The device check (benchmarks/gpu_check.py; README, "Checking a GPU host"): one time-boxed run
# on a GPU host that installs the CUDA column itself (so it does not depend on `install`) and
# writes one report to $OUT, else gpu-check-out/. `make gpu-check DRY_RUN=1` checks its plan
# here instead, with the local install; ARGS passes options on, e.g. ARGS="--cores 16".
ifeq ($(DRY_RUN),1)
gpu-check: install
	$(VENV)/bin/python benchmarks/gpu_check.py run --dry-run --venv $(VENV) $(ARGS)
else
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py run --venv $(VENV) $(ARGS)
endif

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) protos/v1 build *.egg-info
