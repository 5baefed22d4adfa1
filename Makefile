# The two commands a newcomer needs:  make demo  (main job, end to end)  and  make test.
# Everything is installed by the targets below; a second run reuses what is there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOURS  ?= 3

.PHONY: install system-deps jars up down status topics demo simulate joiner realtime bronze silver batch-labels gold \
	realtime-log training-set quality feast-apply materialize serve replay-set skew-report monitor breaker breaker-watch \
	ab-report bench-scoring full-retrain warm-start online registry registry-gc promote rollback evaluate evaluate-features evaluate-spread learning-curve delay-curve delay-report test kill-loop lint flink bench-produce \
	bench-joiner bench-restart bench-decode bench-retrieval bench-funnel bench-train bench-online-freshness bench-online bench-materialize bench-freshness chaos chaos-test soak cluster cluster-up cluster-down clean

install: system-deps $(VENV)/.installed jars

# Debian packages: Redis server, Java 17 and Maven (for the Kafka and Spark jars).
system-deps:
	@command -v redis-server >/dev/null && command -v mvn >/dev/null && command -v java >/dev/null || { \
	  echo "installing redis-server, maven, openjdk-17 with apt-get"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server maven openjdk-17-jdk-headless; }

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

# The always-on label joiner (faust worker; start N of them to share the partitions);
# ADS_LABEL_SCHEME=naive|fnw|delay_curve picks the labels.
joiner: up
	$(VENV)/bin/faust -A label_joiner.app worker -l info --without-web

# The always-on real-time feature worker (per user, ad, advertiser; into Redis in Feast's layout).
realtime: up
	$(VENV)/bin/faust -A streams.realtime_app worker -l info --without-web

# Scheduled Spark jobs on Delta, one UTC day each (DS=YYYY-MM-DD, default yesterday); infra/schedule.crontab
# runs them hourly, daily and weekly. Each checks the partitions it writes (data-quality reports).
DS ?= $(shell date -u -d yesterday +%F)
bronze: up
	$(PY) -m batch_jobs.bronze --ds $(DS)

# The batch twin of the label joiner: matured labels of DS from bronze (run after the conversion window).
silver: up
	$(PY) -m batch_jobs.silver --ds $(DS)
batch-labels: silver

gold: up
	$(PY) -m batch_jobs.gold --ds $(DS)

# The real-time feature rows (the realtime_features topic) into lake/realtime/<view>, exactly once.
realtime-log: up
	$(PY) -m batch_jobs.realtime_log --ds $(DS)

# Training set with point-in-time features for START..END (default DS..DS), negatives downsampled.
START ?= $(DS)
END ?= $(START)
training-set: up
	$(PY) -m batch_jobs.training_set --start $(START) --end $(END)

# The data-quality report of one partition (TABLE=gold/user_features DS=...); exit 1 on a critical failure.
quality: install
	$(PY) -m batch_jobs.quality --table $(TABLE) --ds $(DS)

# Feast: register the repo's definitions; load gold into the online store with our bulk loader (Feast reads it;
# Redis down is a loud error).
feast-apply: up
	$(PY) -m feature_repo.cli apply
materialize: up
	$(PY) -m feature_repo.materialize materialize-incremental $$(date -u +%Y-%m-%dT%H:%M:%S)

# The ranker's three cadences (trainers/; models in var/registry, `python -m trainers.registry list`):
# weekly full retrain over DAYS days of training sets, daily warm start from the promoted model over DS, and the
# always-on online trainer on the joiner's training examples (SCHEME=naive|fnw|delay_curve).
DAYS ?= 30
SCHEME ?= fnw
full-retrain: up
	$(PY) -m trainers.full_retrain --days $(DAYS)
warm-start: up
	$(PY) -m trainers.warm_start --ds $(DS)
online: up
	$(PY) -m trainers.online --scheme $(SCHEME)
registry: install
	$(PY) -m trainers.registry list
# Retention (crontab: hourly): every version but the newest KEEP and the promotion history is removed.
registry-gc: install
	$(PY) -m trainers.registry gc --keep $(or $(KEEP),20)
# Promote a version, or roll back to the previously promoted one: make promote VERSION=v000003-warm
promote: install
	$(PY) -m trainers.registry promote $(VERSION) --reason "$(or $(REASON),by hand)"
rollback: install
	$(PY) -m trainers.registry rollback --reason "$(or $(REASON),by hand)"

# The ranker against the simulator's truth: oracle, full retrain, warm start, online after a drift, frozen,
# River and LightGBM peers, and delay correction for CVR (HTML report in var/evaluation), over WORLDS worlds
# (DELAY_WORLDS for the delay table) with 95 % intervals. SCALE=ci|small|full; EFFECTS=realistic turns on the
# simulator's feature-visible effects.
SCALE ?= full
WORLDS ?= 3
DELAY_WORLDS ?= 5
EFFECTS ?= off
evaluate: install
	$(PY) -m trainers.evaluate --scale $(SCALE) --worlds $(WORLDS) --delay-worlds $(DELAY_WORLDS) --effects $(EFFECTS)

# Is the feature store worth having: every model with and without the feature service's features, through the
# real pipeline (Kafka, the real-time worker, bronze/silver/gold, the point-in-time training-set builder) on a
# world with the simulator's feature-visible effects; WORLDS worlds with 95 % intervals (var/evaluation/features).
evaluate-features: up
	$(PY) -m trainers.evaluate_features --scale $(SCALE) --worlds $(WORLDS)

# How far noise moves each claim of the evaluation: SEEDS runs at SCALE=ci, new initial weights on the CI world
# (VARY=training, what another machine's float rounding does) or new worlds (VARY=data); a table per claim.
SEEDS ?= 11-20
VARY ?= training
evaluate-spread: install
	$(PY) -m trainers.evaluate --scale ci --seeds $(SEEDS) --vary $(VARY) --out var/evaluation/spread-$(VARY)

# The ranker against LightGBM as the history grows (latent world, ids and context): CURVE_DAYS history lengths,
# each trained as the full retrain trains; is the CI scale's gap the model or the data?
CURVE_DAYS ?= 2 4 8
WORLD ?= 11
learning-curve: install
	$(PY) -m trainers.learning_curve --seed $(WORLD) --days $(CURVE_DAYS)

# Fit the conversion-delay curve (Kaplan-Meier, open clicks censored) and publish it (JSON + PNG).
delay-curve: up
	$(PY) -m label_joiner.delay_curve

# Each label scheme's emitted examples against the simulator's truth on the freshest day (HTML report).
delay-report: install
	$(PY) -m label_joiner.delay_report

# The main job, end to end on the local stack, the loop closed (infra/demo.py): a bootstrap day and DAYS_LOOP
# closed-loop days where the scorer picks every ad, with the batch side, the three cadences, log-and-replay,
# the circuit breaker, monitoring and the A/B report.
DAYS_LOOP ?= 2
demo: up
	$(PY) -m infra.demo --days $(DAYS_LOOP)

# Scoring and the auction as an HTTP service (POST /score, GET /health, GET /metrics) on 127.0.0.1:18080.
serve: up
	$(PY) -m streams.serving

# Log-and-replay: training rows from the prediction log joined to matured labels (features exactly as served),
# and the skew report (logged features against the same features recomputed from the lake).
replay-set: up
	$(PY) -m batch_jobs.replay_set --start $(START) --end $(END)
skew-report: up
	$(PY) -m batch_jobs.skew_report --start $(START) --end $(END)

# Monitoring (HTML + JSON in var/monitor): PSI, calibration drift, feature freshness, label-join lag, dead-letter
# rates, scoring latency, circuit-breaker events. The circuit breaker alone: once, or always on (breaker-watch).
monitor: up
	$(PY) -m batch_jobs.monitor
breaker: up
	$(PY) -m trainers.circuit_breaker
breaker-watch: up
	$(PY) -m trainers.circuit_breaker --watch
ab-report: up
	$(PY) -m batch_jobs.ab_report

test: up
	$(PY) -m ruff check .
	$(PY) -m pytest tests -m "not cluster and not fault" --durations=15 --doctest-modules schemas streams/dead_letter.py streams/state.py streams/event_clock.py infra/settings.py \
	  streams/state_dir.py label_joiner/join.py label_joiner/rules.py batch_jobs/days.py trainers/loss.py \
	  trainers/online.py trainers/served_features.py trainers/warm_start.py trainers/circuit_breaker.py feature_repo/loads.py \
	  streams/simulator/behaviour.py

# Two simulated days while every always-on process is killed (kill -9), the broker and Redis restart and Spark jobs
# are killed mid-run; then every record, label, Delta row, online row and the registry are checked (a table).
# `make chaos-test` runs a reduced form with its assertions (tests/test_chaos.py, marker `fault`, about 14 min here:
# left out of `make test`, as the soak is).
chaos: up
	$(PY) -m infra.chaos
chaos-test: up
	$(PY) -m pytest tests/test_chaos.py -m fault -v

# 30 simulated days through the joiner, the real-time worker and the online trainer, compressed into one run (about
# 15 min); plots RSS, consumer lag, state bytes and registry bytes (var/soak<time>/soak.png) and says whether each
# stayed bounded.
soak: up
	$(PY) -m infra.soak

# The same code on a 3-node KRaft cluster (replication 3, min ISR 2): two label joiners, one broker killed mid-run;
# bronze/silver/gold submitted to a Spark standalone master and worker (pyspark's own jars) reading that cluster.
cluster: install
	$(PY) -m pytest tests/test_kafka_cluster.py -m cluster -v
cluster-up: install
	$(PY) -m infra.kafka_cluster up
	$(PY) -m infra.spark_standalone up
cluster-down:
	$(PY) -m infra.kafka_cluster down
	$(PY) -m infra.spark_standalone down

# kill -9 the label joiner at random moments, ROUNDS times, then check every label exact and no output twice.
ROUNDS ?= 20
kill-loop: up
	ADS_KILL_ROUNDS=$(ROUNDS) $(PY) -m pytest tests/test_label_joiner_worker.py -k kill -x -v

lint: install
	$(PY) -m ruff check .

bench-produce: up
	$(PY) -m bench.produce --hours 4

# Apache Flink (PyFlink, separate venv .venv-flink) and its Kafka SQL connector, for the joiner benchmark.
flink: install
	bench/flink/setup.sh

bench-joiner: up flink
	$(PY) -m bench.joiner --hours 24

# State size per open impression and restart-to-caught-up time with OPEN open impressions in state.
OPEN ?= 5000000
bench-restart: up
	$(PY) -m bench.joiner_restart --open $(OPEN)

bench-decode: install
	$(PY) -m bench.decode

# Registry bytes a day of online publishing at the live rate: gated deltas vs a full copy every 10 s.
bench-online-publish: install
	$(PY) -m bench.online_publish --hours 24

# An example's arrival in Kafka -> a published online model that learned it (p50/p99 at the live rate and above).
bench-online-freshness: up
	$(PY) -m bench.online_freshness

# Scoring latency of one request (500 candidates: features + model + auction + logging) vs one candidate at a
# time, and the HTTP service's requests/s and p99 under load.
bench-scoring: up
	$(PY) -m bench.scoring

# Candidate retrieval: the two-tower HNSW index vs exhaustive scoring by the towers (latency, recall@500), and
# the towers' top k vs popularity on held-out clicks.
bench-retrieval: install
	$(PY) -m bench.retrieval

# The funnel in the closed loop: revenue and CTR of retrieval + pre-ranker + ranker vs the ranker on every ad.
bench-funnel: up
	$(PY) -m bench.funnel

# Training examples/s of the full ranker vs a plain MLP over the same embeddings, with the input-wait share.
bench-train: install
	$(PY) -m bench.train_throughput

# One ranking request (1 user + 500 ads): our read path vs Feast get_online_features vs a raw redis-py pipeline.
bench-online: up
	$(PY) -m bench.online_read

# Loading ROWS feature rows into Redis: feast materialize vs our writer vs pipelined HSET of the same bytes.
ROWS ?= 200000
bench-materialize: up
	$(PY) -m bench.materialize --rows $(ROWS)

# Real-time features: event time -> readable in Redis, p50/p99 at a live rate.
bench-freshness: up
	$(PY) -m bench.realtime_freshness --rate 200 --seconds 30

clean: down
	rm -rf var
