# Two commands set everything up on a fresh machine: `make test` and `make pretrain`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test pretrain bench cifar10 imagenette clean

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

# Short real-data runs (README "Measured"): CIFAR10 / IMAGENETTE point at the ImageFolder copies.
CIFAR10    ?= ../shared/data/cifar10
IMAGENETTE ?= ../shared/data/imagenette2
CIFAR_FLAGS = --dataset=cifar10 --data_root=$(CIFAR10) --fraction=0.1 --model=tiny
cifar10: $(VENV)/installed
	$(PY) pretrain.py $(CIFAR_FLAGS) --out_dir=out/cifar10/splitmask --epochs=7 --batch_size=128 --blr=1.5e-2 \
		--warmup_epochs=1 --vocab_size=1024 --tokenizer_samples=200000 --workers=2
	$(PY) probe.py $(CIFAR_FLAGS) --out_dir=out/cifar10/probe_random
	$(PY) probe.py $(CIFAR_FLAGS) --out_dir=out/cifar10/probe_splitmask --init=out/cifar10/splitmask/ckpt.pt

imagenette: $(VENV)/installed
	$(PY) pretrain.py --dataset=imagenette --data_root=$(IMAGENETTE) --out_dir=out/imagenette/splitmask --model=tiny \
		--img_size=112 --batch_size=64 --epochs=3 --blr=1.5e-2 --warmup_epochs=1 --vocab_size=1024 \
		--tokenizer_samples=200000 --workers=2 --log_every=20

clean:
	rm -rf $(VENV) out
