# `make main` and `make test` set up .venv (Python 3.12 + requirements.txt) on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: main test setup
main: $(STAMP)
	$(PY) -m lm_experiment.main_job

test: $(STAMP)
	$(PY) -m pytest -q -n auto tests

setup: $(STAMP)

$(STAMP): requirements.txt .ci/find_python312
	rm -rf $(VENV)
	"$$(sh .ci/find_python312)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)
