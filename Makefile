# Two commands for a fresh machine: `make quickstart` and `make test`.
# Both create .venv when it is missing (torch's CPU build first, then the rest of the stack).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# on machines that have no CPU wheel of torch 2.13.0 at hand.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench lint format readme clean venv slurm-stop lego-demo lego-demo-init

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -c "import torch, deepspeed, megatron.core, datatrove, sentencepiece, mlflow; print('stack ok: torch', torch.__version__)"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/pretrain quickstart

# The tests talk to a real single-node SLURM (installed with apt-get and started here when
# missing; state under /tmp/pretrain-slurm) and to real MLflow servers they start themselves.
test: $(STAMP)
	$(BIN)/python -m cluster.local_slurm start
	$(BIN)/python -m pytest -q

slurm-stop:
	$(BIN)/python -m cluster.local_slurm stop

# Each prints a table and writes bench/results/<name>.json; ratios are measured side by side.
bench: $(STAMP)
	$(BIN)/python bench/bench_attention.py
	$(BIN)/python bench/bench_decode.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python -m bench.bench_data
	$(BIN)/python bench/bench_parallel.py
	$(BIN)/python bench/bench_lego.py

# A tiny Lego-MT on the gettext catalogs every machine has: data, the two stages, the matched
# single-model baseline (same config and --set, so the same steps and batch size), one detached
# flow translating, and the BLEU/chrF table of every flow against the baseline (README: Lego-MT).
LEGO_DIR ?= runs/lego
LEGO_SET ?= --set train.data_dir=$(LEGO_DIR)/data/tok --set train.stage1_steps=200 --set train.stage2_steps=200
lego-demo: $(STAMP)
	$(BIN)/pretrain lego-mt data $(LEGO_DIR)/data --langs en de fr --vocab-size 1000 --max-pairs 4000
	$(BIN)/pretrain lego-mt train configs/lego-mt-tiny.yaml --run-dir $(LEGO_DIR)/run $(LEGO_SET)
	$(BIN)/pretrain lego-mt baseline configs/lego-mt-tiny.yaml --run-dir $(LEGO_DIR)/baseline $(LEGO_SET)
	$(BIN)/pretrain lego-mt detach $(LEGO_DIR)/run --encoder de --decoder m2m --out $(LEGO_DIR)/de-m2m
	printf 'Datei öffnen\nDokument speichern\n' | $(BIN)/pretrain translate $(LEGO_DIR)/de-m2m --src-lang de --tgt-lang en --beam 3
	$(BIN)/pretrain lego-mt compare $(LEGO_DIR)/run --baseline $(LEGO_DIR)/baseline --limit 100

# The paper's setting, after lego-demo: every branch starts from one trained multilingual model
# (lego-demo's baseline), against that model trained on for the same steps on the same pairs.
lego-demo-init: $(STAMP)
	$(BIN)/pretrain lego-mt train configs/lego-mt-tiny.yaml --run-dir $(LEGO_DIR)/run-init $(LEGO_SET) --set train.init_from=$(LEGO_DIR)/baseline
	$(BIN)/pretrain lego-mt baseline configs/lego-mt-tiny.yaml --run-dir $(LEGO_DIR)/baseline-cont $(LEGO_SET) --set train.init_from=$(LEGO_DIR)/baseline
	$(BIN)/pretrain lego-mt compare $(LEGO_DIR)/run-init --baseline $(LEGO_DIR)/baseline-cont --limit 100

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

readme: $(STAMP)
	$(BIN)/python -m pretrain.config_reference README.md

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache
