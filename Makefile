# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine
# with only Python 3.11+ and the package registries.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU machine can override: make TORCH_SPEC=torch install
TORCH_SPEC ?= torch==2.13.0

.PHONY: install services demo test test-unit test-integration lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# rapidocr pulls the GUI build of OpenCV (needs libGL); the headless one must own cv2.
	$(PY) -m pip install -q --force-reinstall --no-deps opencv-python-headless
	touch $@

# The tests start their own redis-server and prometheus when the binaries are there (else
# those tests skip), check the alert rules with promtool (Debian's prometheus package ships
# both), and render Chinese text with a CJK font (else the Chinese cases skip).
services:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null \
		&& command -v prometheus >/dev/null && fc-list :lang=zh | grep -q . \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& apt-get install -y -qq --no-install-recommends \
			redis-server prometheus fonts-wqy-zenhei >/dev/null; } \
		|| echo "redis-server, prometheus or a CJK font is missing: those tests will be skipped"

demo: install
	$(VENV)/bin/zimage-stream demo

# Four test processes (pytest-xdist), work-stealing: most integration tests wait on a
# broker, a worker or an engine process rather than on the CPU, so on two cores four
# processes still gain (the suite: 750 s with two, 486 s with four, on a 2-core AMD EPYC),
# and stealing keeps one process from ending the run alone with a queue of slow tests.
PYTEST_WORKERS ?= 4
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test: install services
	$(PYTEST)

test-unit: install
	$(PYTEST) tests/unit

test-integration: install services
	$(PYTEST) tests/integration

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache zimage-data .pytest_cache .mypy_cache .ruff_cache
