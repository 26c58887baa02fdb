# Two commands do all set-up on a fresh machine:
#   make demo   pretrain a small BERT on the bundled corpus and show what it learned
#   make test   run the test suite (what CI runs)
# Both create .venv with pip when it is missing.
#   make demo-speech   pretrain a tiny wav2vec 2.0, then keyword and speaker probes, pretrained vs scratch
#   make demo-vision   pretrain SimCLR on Fashion-MNIST, then kNN and linear probes, pretrained vs random init

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-speech demo-vision test lint clean

$(BIN)/selfsup-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/selfsup-installed
	$(BIN)/python recipes/demo.py

# One torch thread: the wav2vec2 steps are small, and two threads lose on 2 shared cores (README, Speech).
demo-speech: $(BIN)/selfsup-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/speech_downstream.py --pretrain-steps 2000 \
		--pretrain-sources asterisk-en --protocols probe --tasks speech-keywords asterisk-speakers \
		--seeds 0 1 2 --work-dir runs/speech_demo --results runs/speech_demo/RESULTS_speech.md

# The simclr_tiny row of the README's vision table: 400 steps x 256 per seed, 3 seeds, probes on 5,000 / 2,000 images.
demo-vision: $(BIN)/selfsup-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/vision_pretrain_vs_scratch.py --configs recipes/configs/simclr_tiny.yaml \
		--seeds 0 1 2 --steps 400 --batch 256 --probe-train 5000 --probe-test 2000 --protocols knn linear \
		--work-dir runs/vision_demo --results runs/vision_demo/RESULTS_vision.md

test: $(BIN)/selfsup-installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/selfsup-installed
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
