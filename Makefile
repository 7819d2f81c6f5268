# Two commands set everything up on a fresh machine: `make test` and `make pretrain`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test pretrain bench clean

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
	$(PY) bench.py

clean:
	rm -rf $(VENV) out
