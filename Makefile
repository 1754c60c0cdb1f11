# Two commands for a new user: `make demo` (the whole pipeline on the bundled corpus) and `make test`
# (`make test-slow`: the multi-process, multi-node and SLURM tier; CI runs both).
# Both bootstrap .venv with pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped
# CPU machines get the pinned CPU wheel; a machine with a GPU keeps (or resolves) its own CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO_DIR ?= data_shards/demo
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-data demo-pretrain demo-finetune demo-export transfer transfer-data transfer-pretrain transfer-bert transfer-bert-data transfer-bert-pretrain test test-slow test-all lint format bench venv clean-demo gpu-wheels

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	# --no-build-isolation: DeepSpeed's sdist must build against the torch above, not pull a CUDA one.
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

DEMO_STORE := sqlite:///$(CURDIR)/runs/demo-pretrain/mlflow.db
demo: demo-data demo-pretrain demo-finetune demo-export
	@echo "demo done: shards in $(DEMO_DIR), pre-training run in runs/demo-pretrain (loss_curve.png, checkpoints/),"
	@echo "fine-tuning runs in runs/demo-finetune (report.json, confusion_matrix.png), the hand-off in runs/demo-export"
	@echo "(README.md: its model card), registered in MLflow as demo-bert (alias: champion). Load it:"
	@echo "  transformers: AutoModelForMaskedLM.from_pretrained(\"runs/demo-export\"), AutoTokenizer.from_pretrained(\"runs/demo-export\")"
	@echo "  registry:     MLFLOW_TRACKING_URI=$(DEMO_STORE) python -c 'import mlflow; print(mlflow.artifacts.download_artifacts(\"models:/demo-bert@champion\"))'"
	@echo "  fine-tune:    $(PY) -m pipeline finetune --config configs/finetune/demo-sentiment.yaml --checkpoint models:/demo-bert@champion --tracking-uri $(DEMO_STORE)"
	@echo "  evaluate:     $(PY) -m pipeline evaluate --checkpoint runs/demo-export --suite configs/evaluate/quick.yaml --baseline random"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri $(DEMO_STORE)"

demo-data: $(STAMP)
	$(PY) -m pipeline tokenizer --config configs/tokenizer/demo.yaml --output $(DEMO_DIR)/tokenizer --overwrite
	$(PY) -m pipeline shard --config configs/preprocess/demo-bert.yaml --tokenizer $(DEMO_DIR)/tokenizer --output $(DEMO_DIR)/shards-bert-128 --workers 2
	$(PY) -m pipeline shard --config configs/preprocess/demo-gpt.yaml --tokenizer $(DEMO_DIR)/tokenizer --output $(DEMO_DIR)/shards-gpt-128 --workers 2
	$(PY) -m pipeline inspect $(DEMO_DIR)/shards-bert-128 --verify --plot $(DEMO_DIR)/shards-bert-128/lengths.png
	$(PY) -m pipeline inspect $(DEMO_DIR)/shards-gpt-128 --verify
	$(PY) -m pipeline inspect $(DEMO_DIR)/shards-bert-128 --decode 2 --json

# Fine-tunes the demo checkpoint on the bundled movie-review snippets, then the same architecture from random
# initialisation with the same budget, and prints both dev scores (configs/finetune/demo-sentiment.yaml).
DEMO_CHECKPOINT ?= runs/demo-pretrain
demo-finetune: $(STAMP)
	$(PY) benchmarks/transfer.py --checkpoint $(DEMO_CHECKPOINT) --tasks demo-sentiment --keep runs/demo-finetune \
		--train-examples 0 --dev-examples 0 --epochs 3 --lr 5e-4 --table

# The hand-off: a Hugging Face directory with its model card, registered as a new version of demo-bert in the
# run's MLflow store (each `make demo` adds a version; the alias champion moves to it).
demo-export: $(STAMP)
	$(PY) -m pipeline export --checkpoint $(DEMO_CHECKPOINT) --output runs/demo-export --overwrite \
		--register demo-bert --alias champion --card.license other

# A small BERT for a few minutes on CPU; re-running continues from its last checkpoint (--resume auto).
demo-pretrain: $(STAMP)
	$(PY) -m pipeline train --config configs/pretrain/demo.yaml

# What pre-training buys, on the tasks in ../shared/data (about an hour on 2 CPU cores): a general corpus
# (the bundled speeches and the training texts of the fine-tuning sets, never their dev splits), a tiny pre-LN
# GPT on it, a second phase on each task's own texts, then benchmarks/transfer.py fine-tunes from both
# checkpoints and from random initialisation with the same budget, over three seeds, with 2,400 labelled
# examples and then with 300. README: "What pre-training buys".
TRANSFER_DIR ?= data_shards/transfer
TRANSFER_TASKS ?= spam movie-sentiment
TRANSFER_CORPUS_TASKS ?= spam movie-sentiment vitaminc squad11 social-iqa
TRANSFER_SEEDS ?= 1234,1,2
transfer: transfer-data transfer-pretrain
	$(PY) benchmarks/transfer.py --tasks $(shell echo $(TRANSFER_TASKS) | tr ' ' ,) --seeds $(TRANSFER_SEEDS) \
		--start adapted=runs/transfer-adapt-{task} --start general=runs/transfer-general \
		--keep runs/transfer-finetune --table -- --finetune.dropout 0.1 --finetune.pooling mean
	$(PY) benchmarks/transfer.py --tasks $(shell echo $(TRANSFER_TASKS) | tr ' ' ,) --seeds $(TRANSFER_SEEDS) \
		--train-examples 300 --epochs 10 --start adapted=runs/transfer-adapt-{task} \
		--keep runs/transfer-finetune-300 --table -- --finetune.dropout 0.1 --finetune.pooling mean

transfer-data: $(STAMP)
	for t in $(TRANSFER_CORPUS_TASKS); do \
		$(PY) -m pipeline unlabeled --config configs/finetune/$$t.yaml --output $(TRANSFER_DIR)/text/$$t.jsonl.gz || exit 1; done
	$(PY) -m pipeline tokenizer --config configs/tokenizer/transfer.yaml --output $(TRANSFER_DIR)/tokenizer --overwrite
	$(PY) -m pipeline shard --config configs/preprocess/transfer-gpt.yaml --tokenizer $(TRANSFER_DIR)/tokenizer \
		--output $(TRANSFER_DIR)/shards-general --workers 2 --overwrite
	for t in $(TRANSFER_TASKS); do \
		$(PY) -m pipeline shard --config configs/preprocess/transfer-gpt.yaml --tokenizer $(TRANSFER_DIR)/tokenizer \
			--input $(TRANSFER_DIR)/text/$$t.jsonl.gz --output $(TRANSFER_DIR)/shards-$$t --workers 2 --overwrite || exit 1; done

transfer-pretrain: $(STAMP)
	$(PY) -m pipeline train --config configs/pretrain/transfer-gpt.yaml
	for t in $(TRANSFER_TASKS); do \
		$(PY) -m pipeline train --config configs/pretrain/transfer-gpt-adapt.yaml --data.shards $(TRANSFER_DIR)/shards-$$t \
			--train.output_dir runs/transfer-adapt-$$t || exit 1; done

# The BERT recipe (issue 12; README, "The BERT recipe: make transfer-bert"): BERT pairs of the same general
# corpus and tokenizer as `make transfer`, BERT-Tiny post-LN MLM + NSP for 20,000 steps (50 minutes on 2 cores),
# a second phase on each task's texts (Google's single-sentence pairs), then the same benchmark as the GPT recipe
# (fine-tuning lr 1e-3: the pre-trained BERT body needs it) and one table against random
# (benchmarks/transfer_table.py). About 1 h 45 min on 2 CPU cores in all.
TRANSFER_BERT_RESULTS ?= runs/transfer-bert-results
transfer-bert: transfer-data transfer-bert-data transfer-bert-pretrain
	mkdir -p $(TRANSFER_BERT_RESULTS)
	$(PY) benchmarks/transfer.py --tasks $(shell echo $(TRANSFER_TASKS) | tr ' ' ,) --seeds $(TRANSFER_SEEDS) --lr 1e-3 \
		--start bert-adapted=runs/transfer-bert-adapt-{task} --start bert-general=runs/transfer-bert-general \
		--keep runs/transfer-bert-finetune --table -- --finetune.dropout 0.1 --finetune.pooling mean \
		> $(TRANSFER_BERT_RESULTS)/bert-2400.json
	$(PY) benchmarks/transfer.py --tasks $(shell echo $(TRANSFER_TASKS) | tr ' ' ,) --seeds $(TRANSFER_SEEDS) \
		--train-examples 300 --epochs 10 --lr 1e-3 --start bert-adapted=runs/transfer-bert-adapt-{task} \
		--keep runs/transfer-bert-finetune-300 --table -- --finetune.dropout 0.1 --finetune.pooling mean \
		> $(TRANSFER_BERT_RESULTS)/bert-300.json
	$(PY) benchmarks/transfer.py --tasks vitaminc,social-iqa --seeds $(TRANSFER_SEEDS) \
		--start bert-general=runs/transfer-bert-general --keep runs/transfer-bert-finetune-pairs --table \
		-- --finetune.dropout 0.1 > $(TRANSFER_BERT_RESULTS)/bert-pairs.json
	$(PY) benchmarks/transfer_table.py $(TRANSFER_BERT_RESULTS)/*.json

transfer-bert-data: $(STAMP)
	$(PY) -m pipeline shard --config configs/preprocess/transfer-bert.yaml --tokenizer $(TRANSFER_DIR)/tokenizer \
		--output $(TRANSFER_DIR)/shards-bert-general --data.dupe_factor 5 --workers 2 --overwrite
	for t in $(TRANSFER_TASKS); do \
		$(PY) -m pipeline shard --config configs/preprocess/transfer-bert.yaml --tokenizer $(TRANSFER_DIR)/tokenizer \
			--input $(TRANSFER_DIR)/text/$$t.jsonl.gz --output $(TRANSFER_DIR)/shards-bert-$$t \
			--data.single_sentence_documents notnext_pair --data.dupe_factor 10 --workers 2 --overwrite || exit 1; done

transfer-bert-pretrain: $(STAMP)
	$(PY) -m pipeline train --config configs/pretrain/transfer-bert.yaml
	for t in $(TRANSFER_TASKS); do \
		$(PY) -m pipeline train --config configs/pretrain/transfer-bert-adapt.yaml --data.shards $(TRANSFER_DIR)/shards-bert-$$t \
			--train.output_dir runs/transfer-bert-adapt-$$t || exit 1; done

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py
	@test -d runs/demo-pretrain/checkpoints || { echo "benchmarks/transfer.py needs the demo checkpoint: run make demo first"; exit 1; }
	$(PY) benchmarks/transfer.py --checkpoint runs/demo-pretrain

# Wheels for benchmarks/gpu_check.sh on a GPU machine without network (Python 3.12, torch preinstalled): the
# packages of requirements-gpu.txt for CPython $(GPU_PYTHON), and DeepSpeed built here as a wheel without
# prebuilt ops (the check uses none), into .whl/ (ignored by git; a few MB, carried to the machine).
GPU_PYTHON ?= 3.12
GPU_PLATFORMS := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp $(GPU_PLATFORMS) -d .whl -r requirements-gpu.txt
	DS_ACCELERATOR=cuda DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --disable-pip-version-check --no-cache-dir \
		--no-deps --no-build-isolation -w .whl \
		"$$(grep -i '^deepspeed==' requirements.txt)"
	@ls .whl && du -sh .whl

clean-demo:
	rm -rf $(DEMO_DIR) runs/demo-pretrain runs/demo-finetune runs/demo-export
