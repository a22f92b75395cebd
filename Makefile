# Two entry points: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip compiles no bytecode at install (all of torch and CUDA's Python files: about 25 s
# of the setup); the first interpreter to import a module writes its bytecode and the
# later ones read it. Hence bytecode writing on, whatever the caller's environment says.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint bench venv clean tools

# The tests run a real Prometheus (and promtool) and put processes in network
# namespaces (iproute2): Debian's packages, installed quietly when missing (CI is root).
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v ip >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends prometheus iproute2 >/dev/null \
	       && { service prometheus stop >/dev/null 2>&1 || true; }; }

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --no-compile --disable-pip-version-check -e '.[test,bench]'
	touch $@

demo: venv
	$(BIN)/distbelief up

# two pytest workers, each pinned to its half of the cores (tests/conftest.py); one on
# a single core. The longest tests start first; the tests that run `up` share a worker.
TEST_WORKERS ?= $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 1)

test: venv tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# the tests that start no process and train no network (about 40 s on 2 cores)
test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
