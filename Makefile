# Two commands set everything up on a fresh machine: `make test` and `make pretrain`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test pretrain bench row clean

# The virtual environment is (re)built only when requirements.txt changes.
$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# pytest exits 5 when it collects no tests, so an empty suite fails here too.
test: $(VENV)/installed
	$(PY) -m pytest -q tests

pretrain: $(VENV)/installed
	$(PY) pretrain.py

bench: $(VENV)/installed
	$(PY) bench.py $(if $(wildcard ../shared/data/imagenette2),--data=../shared/data/imagenette2)

# Experiments (README "Results"): every row of a table pre-trains (except random init), then probes
# the frozen encoder and fine-tunes it; each stage resumes where it stopped. One row:
#   make row DATASET=cifar10 ROW=beit        all rows of a table: make exp-cifar10, make exp-imagenette
CIFAR10    ?= ../shared/data/cifar10
IMAGENETTE ?= ../shared/data/imagenette2
EXP        ?= out/exp
# The README's rows were measured in fp32; DTYPE=auto trains in bf16 where the hardware has it.
DTYPE      ?= float32
DATA_cifar10     = --dataset=cifar10 --data_root=$(CIFAR10) --fraction=0.2 --model=tiny --img_size=32 --patch_size=4
DATA_imagenette  = --dataset=imagenette --data_root=$(IMAGENETTE) --model=tiny --img_size=112 --patch_size=16
PRETRAIN_cifar10    = --epochs=8 --batch_size=128 --blr=1.5e-2 --warmup_epochs=1 --vocab_size=1024 --tokenizer_samples=200000 --min_block=4
PRETRAIN_imagenette = --epochs=8 --batch_size=128 --blr=1.5e-2 --warmup_epochs=1 --vocab_size=1024 --tokenizer_samples=200000 --min_block=4
FINETUNE_cifar10    = --epochs=5 --batch_size=128 --warmup_epochs=1
FINETUNE_imagenette = --epochs=5 --batch_size=128 --warmup_epochs=1
# Table 8's rows, each method at its paper default masking; then Table 2's tokenizers; then second
# seeds; then BEiT at SplitMask's compute (a SplitMask step costs 1.30-1.32x BEiT's FLOPs for ViT-Tiny
# here, so 11 BEiT epochs cost slightly more than 8 SplitMask epochs).
ROWS         ?= random splitmask beit split_inpaint split_match tok_random_patches tok_random_projection random_seed1 splitmask_seed1 beit_equal_compute
SPLIT         = --mask_kind=block --mask_ratio=0.5
ROW_beit                  = --method=beit --mask_kind=block --mask_ratio=0.4
ROW_beit_equal_compute    = $(ROW_beit) --epochs=11
ROW_splitmask             = $(SPLIT)
ROW_split_inpaint         = $(SPLIT) --nce_weight=0
ROW_split_match           = $(SPLIT) --mim_weight=0
ROW_tok_random_patches    = $(SPLIT) --tokenizer=random_patches
ROW_tok_random_projection = $(SPLIT) --tokenizer=random_projection
ROW_splitmask_seed1       = $(SPLIT) --seed=1
SEED_random_seed1 = --seed=1
SEED_splitmask_seed1 = --seed=1
# Random init fine-tunes without layer decay: decay would freeze its random early layers.
NO_PRETRAINING = random random_seed1
FINETUNE_ROW_random = --layer_decay=1.0
FINETUNE_ROW_random_seed1 = --layer_decay=1.0
ROW_DIR = $(EXP)/$(DATASET)/$(ROW)
INIT    = $(if $(filter $(ROW),$(NO_PRETRAINING)),,--init=$(ROW_DIR)/pretrain/ckpt.pt)

row: $(VENV)/installed
	$(if $(filter $(ROW),$(NO_PRETRAINING)),,$(PY) pretrain.py $(DATA_$(DATASET)) $(PRETRAIN_$(DATASET)) $(ROW_$(ROW)) \
		--dtype=$(DTYPE) --workers=1 --log_every=20 --out_dir=$(ROW_DIR)/pretrain)
	$(PY) probe.py $(DATA_$(DATASET)) $(SEED_$(ROW)) $(INIT) --workers=1 --out_dir=$(ROW_DIR)/probe
	$(if $(filter tok_%,$(ROW)),,$(PY) finetune.py $(DATA_$(DATASET)) $(FINETUNE_$(DATASET)) $(SEED_$(ROW)) \
		$(FINETUNE_ROW_$(ROW)) $(INIT) --dtype=$(DTYPE) --workers=1 --out_dir=$(ROW_DIR)/finetune)

exp-%: $(VENV)/installed
	for row in $(ROWS); do $(MAKE) --no-print-directory row DATASET=$* ROW=$$row || exit 1; done
	$(PY) probe.py --report=$(EXP)/$*

clean:
	rm -rf $(VENV) out
