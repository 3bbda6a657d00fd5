# Every target bootstraps .venv itself (fresh machine: ~3 minutes of install, once).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.25
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER ?= 0
export TOKENIZERS_PARALLELISM ?= false
export RAY_DEDUP_LOGS ?= 1

.PHONY: install demo vision-demo tune-demo test test-unit test-integration lint bench gpu-bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch is bounded in pyproject.toml so pip takes the CPU wheel on disk here, CUDA on GPU hosts.
	$(BIN)/pip install -q -e '.[dev,hf,tune,curation]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: prepare the Python docs corpus, train `tiny` with 2 workers
# and ZeRO-2 on CPU, register the model in MLflow (sqlite:///mlruns.db), sample from it.
demo: $(STAMP)
	$(BIN)/rpt data prepare configs/tiny-lm.yaml --if-missing
	$(BIN)/rpt train configs/tiny-lm.yaml
	$(BIN)/rpt generate tiny-lm@current --prompt "The for statement" --max-new-tokens 48 --temperature 0.7

# Vision: render 20 fractal classes, pre-train the tiny ViT with MAE (2 workers, ZeRO-2), k-NN/NCM probes
# at every eval, register the encoder (about 4 minutes on 2 cores).
vision-demo: $(STAMP)
	$(BIN)/rpt data prepare configs/tiny-mae.yaml --if-missing
	$(BIN)/rpt train configs/tiny-mae.yaml

# Ray Tune: cosine_rewarm vs infinite over prose -> Python -> C (3 seeds each), debug model on CPU.
tune-demo: $(STAMP)
	$(BIN)/rpt tune configs/tune-debug.yaml

# Own process session + hard bound: a killed run must not leave Ray processes behind.
test: $(STAMP)
	timeout 3000 setsid $(BIN)/python -m pytest -q -ra --durations=25 --timeout 900 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --out benchmarks/results/throughput.json

gpu-bench: $(STAMP)
	$(BIN)/python benchmarks/gpu.py --out benchmarks/results/gpu.json

clean:
	rm -rf results mlartifacts mlruns.db data/prepared .pytest_cache
