# vtunnel developer entry points. Every target sets itself up through `setup`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: setup run test lint bench bench-quick bench-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	@for p in $(dir $(PLUGINS)); do $(BIN)/pip install -q -e $$p || exit 1; done
	@touch $(STAMP)

## run: a server and an agent on loopback; then
##   curl --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:PORT/
run: setup
	$(BIN)/vtunnel demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check vtunnel tests bench plugins
	$(BIN)/ruff format --check vtunnel tests bench plugins
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench-setup: the native tools the harness compares against (kcptun, shadowsocks-libev, nftables, iproute2; needs root or sudo)
bench-setup:
	sh bench/setup.sh || echo "bench-setup: continuing without them; the harness skips what is missing and says so"

bench: setup bench-setup
	$(BIN)/python -m bench run
	$(BIN)/python -m bench.tun --out bench/results/tun

bench-quick: setup bench-setup
	$(BIN)/python -m bench run --quick
	$(BIN)/python -m bench.tun --quick --out bench/results/tun-quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
