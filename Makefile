# Two commands set everything up on a fresh machine: `make test` and `make pretrain`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test test-a test-b test-c pretrain bench gpu-check row size-row exp-size clean

# The virtual environment is (re)built only when requirements.txt changes.
$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# The suite in three parts side by side: most tests wait on a one-thread training subprocess (and its start-up),
# so one pytest leaves the cores idle. pytest exits 5 when it collects no tests, so an empty part fails here too.
TESTS_A = tests/test_pretrain.py tests/test_finetune_probe.py
TESTS_B = tests/test_first_hour.py tests/test_gpu_check.py tests/test_own_data.py
# (--output-sync prints each part whole; make 3.81, macOS's, lacks it and interleaves them. No pytest cache:
# the parts would overwrite each other's list of failed tests.)
test: $(VENV)/installed
	@echo "the tests, in three parts side by side (about 10 minutes on 2 cores); each part prints its results when it ends"
	$(MAKE) --no-print-directory -j3 $(if $(filter output-sync,$(.FEATURES)),--output-sync=target) test-a test-b test-c
test-a: $(VENV)/installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(TESTS_A)
test-b: $(VENV)/installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(TESTS_B)
test-c: $(VENV)/installed  # every other test file, new ones included
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests $(TESTS_A:%=--ignore=%) $(TESTS_B:%=--ignore=%)

pretrain: $(VENV)/installed
	$(PY) pretrain.py

# Speed rows (bench.py); with a folder of JPEGs, the loader rows read it (else bench.py writes its own).
BENCH_DATA ?=
bench: $(VENV)/installed
	$(PY) bench.py $(if $(BENCH_DATA),--data=$(BENCH_DATA))

# Everything a first GPU minute should check, in one table (gpu_check.py); says so and exits 0 without CUDA.
gpu-check: $(VENV)/installed
	$(PY) gpu_check.py

# Experiments (RESULTS.md): every row of a table pre-trains (except random init), then probes the frozen
# encoder and fine-tunes it, each with the dataset's quick recipe; each stage resumes where it stopped.
#   make row DATASET=cifar10 ROW=beit        all rows of a table: make exp-cifar10, make exp-imagenette
# The data folders are variables: make exp-cifar10 CIFAR10=/path/to/cifar10
CIFAR10    ?= data/cifar10
IMAGENETTE ?= data/imagenette2
EXP        ?= out/exp
DATA_cifar10    = --dataset=cifar10 --data_root=$(CIFAR10)
DATA_imagenette = --dataset=imagenette --data_root=$(IMAGENETTE)
# Table 8's rows, each method at its paper default masking; then Table 2's tokenizers; then second
# seeds; then BEiT at SplitMask's compute (a SplitMask step costs 1.30-1.32x BEiT's FLOPs for ViT-Tiny
# here, so 11 BEiT epochs cost slightly more than 8 SplitMask epochs).
ROWS         ?= random splitmask beit split_inpaint split_match tok_random_patches tok_random_projection random_seed1 splitmask_seed1 beit_equal_compute
ROW_beit                  = --method=beit
ROW_beit_equal_compute    = $(ROW_beit) --epochs=11
ROW_split_inpaint         = --nce_weight=0
ROW_split_match           = --mim_weight=0
ROW_tok_random_patches    = --tokenizer=random_patches
ROW_tok_random_projection = --tokenizer=random_projection
ROW_splitmask_seed1       = --seed=1
SEED_random_seed1    = --seed=1
SEED_splitmask_seed1 = --seed=1
# Random init fine-tunes without layer decay: decay would freeze its random early layers.
NO_PRETRAINING = random random_seed1
FINETUNE_ROW_random       = --layer_decay=1.0
FINETUNE_ROW_random_seed1 = --layer_decay=1.0
ROW_DIR = $(EXP)/$(DATASET)/$(ROW)
INIT    = $(if $(filter $(ROW),$(NO_PRETRAINING)),,--init=$(ROW_DIR)/pretrain/ckpt.pt)

row: $(VENV)/installed
	$(if $(filter $(ROW),$(NO_PRETRAINING)),,$(PY) pretrain.py $(DATA_$(DATASET)) $(ROW_$(ROW)) \
		--workers=1 --log_every=20 --out_dir=$(ROW_DIR)/pretrain)
	$(PY) probe.py $(DATA_$(DATASET)) $(SEED_$(ROW)) $(INIT) --workers=1 --out_dir=$(ROW_DIR)/probe
	$(if $(filter tok_%,$(ROW)),,$(PY) finetune.py $(DATA_$(DATASET)) $(SEED_$(ROW)) \
		$(FINETUNE_ROW_$(ROW)) $(INIT) --workers=1 --out_dir=$(ROW_DIR)/finetune)

exp-%: $(VENV)/installed
	for row in $(ROWS); do $(MAKE) --no-print-directory row DATASET=$* ROW=$$row || exit 1; done
	$(PY) report.py --folder=$(EXP)/$*

# The paper's title question, small (RESULTS.md): SplitMask and BEiT pre-trained on 10%, 30% and 100% of Imagenette's
# training images for about the updates of SIZE_EPOCHS epochs of the full set (7, 22 and 73 updates an epoch; the
# quick recipe's 8 epochs: 581, 572 and 584 updates), fewer images taking more epochs, with the same warm-up; each
# probed on the full set. The monitor encodes the same 200 images of each split about every 70 updates.
SIZES       ?= 10 30 100
SIZE_EPOCHS ?= 8
SIZE_10      = --fraction=0.1 --epochs=$(shell expr $(SIZE_EPOCHS) \* 73 / 7) --warmup_epochs=10 --monitor_every=10
SIZE_30      = --fraction=0.3 --epochs=$(shell expr $(SIZE_EPOCHS) \* 73 / 22) --warmup_epochs=3 --monitor_every=3
SIZE_100     = --epochs=$(SIZE_EPOCHS) --warmup_epochs=1
SIZE_DIR     = $(EXP)/size/$(METHOD)_$(SIZE)

size-row: $(VENV)/installed
	$(PY) pretrain.py $(DATA_imagenette) --method=$(METHOD) $(SIZE_$(SIZE)) --monitor_images=200 --workers=1 \
		--log_every=20 --out_dir=$(SIZE_DIR)/pretrain
	$(PY) probe.py $(DATA_imagenette) --init=$(SIZE_DIR)/pretrain/ckpt.pt --workers=1 --out_dir=$(SIZE_DIR)/probe

exp-size: $(VENV)/installed
	for method in splitmask beit; do for size in $(SIZES); do \
		$(MAKE) --no-print-directory size-row METHOD=$$method SIZE=$$size || exit 1; done; done
	$(PY) report.py --folder=$(EXP)/size

clean:
	rm -rf $(VENV) out
