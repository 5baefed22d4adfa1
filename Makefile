# The two commands a newcomer needs:  make demo  (main job, end to end)  and  make test.
# Everything is installed by the targets below; a second run reuses what is there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOURS  ?= 3

.PHONY: install system-deps jars up down status topics demo simulate joiner batch-labels delay-curve test lint bench-produce bench-joiner clean

install: system-deps $(VENV)/.installed jars

# Debian packages: Redis server, Java 17 and Maven (for the Kafka and Spark jars).
system-deps:
	@command -v redis-server >/dev/null && command -v mvn >/dev/null && command -v java >/dev/null || { \
	  echo "installing redis-server, maven, openjdk-17 with apt-get"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server maven openjdk-17-jdk-headless; }
	@$(SUDO) systemctl disable --now redis-server >/dev/null 2>&1 || true

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

jars: $(VENV)/.installed
	$(PY) -m infra.jars

up: install
	$(PY) -m infra.stack up

down:
	@[ -x $(PY) ] && $(PY) -m infra.stack down || true

status:
	$(PY) -m infra.stack status

topics:
	$(PY) -m infra.stack topics

simulate: up
	$(PY) -m streams.simulator --hours $(HOURS) --speed 720 --run-id demo-$$(date +%s)

# The always-on label joiner (faust worker); ADS_LABEL_SCHEME=naive|fnw|delay_curve picks the labels.
joiner: up
	$(VENV)/bin/faust -A label_joiner.app worker -l info --without-web

# The batch twin: matured labels of one UTC day from the raw topics into Delta (DS=YYYY-MM-DD).
batch-labels: up
	$(PY) -m batch_jobs.matured_labels --ds $(DS)

# Fit the conversion-delay curve on the matured labels and publish it (JSON + PNG under var/artifacts).
delay-curve: up
	$(PY) -m label_joiner.delay_curve

# The main job, end to end on the local stack: install, start Kafka and Redis, create topics, run the
# label joiner while simulating a few hours of traffic, print what landed in each topic.
demo: up
	$(PY) -m infra.demo --hours $(HOURS)

test: up
	$(PY) -m ruff check .
	$(PY) -m pytest tests --doctest-modules schemas streams/dead_letter.py infra/settings.py label_joiner/join.py

lint: install
	$(PY) -m ruff check .

bench-produce: up
	$(PY) -m bench.produce --hours 4

bench-joiner: up
	$(PY) -m bench.joiner --hours 6

clean: down
	rm -rf var
