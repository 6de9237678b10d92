# Fresh machine: only python3.11 and make are needed; everything else goes into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,embedded]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/refundctl demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

# Everything but the chaos runs, the benchmarks and the tests marked slow: about a minute.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not chaos and not bench and not slow" $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
