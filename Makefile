# Tributary: the commands. `make test` works on a fresh machine with only Python and make.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, or installed into the current Python on first use.
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen

.PHONY: help sync test cluster-test lint fmt contracts k8s k8s-check dev token demo demo-down compose-check bench chaos

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

sync:  ## install the workspace (uv installed if missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet

# Two pytest processes side by side: the long tests (marked slow: held outages, end-to-end runs,
# fault soaks, time windows, the short cluster failover) in the background, the rest in the
# foreground; the exit code is the worse. The long cluster suite (marked cluster) is cluster-test's.
test: sync  ## the whole test suite (finds or starts RabbitMQ and PostgreSQL)
	@log=$$(mktemp); \
	$(RUN) pytest -m "slow and not cluster" -p no:cacheprovider --durations=10 >$$log 2>&1 & slow=$$!; \
	$(RUN) pytest -m "not slow and not cluster" --durations=20; main=$$?; \
	wait $$slow; held=$$?; [ $$held -eq 5 ] && held=0; \
	echo "== the slow lane (pytest -m slow) =="; cat $$log; rm -f $$log; \
	exit $$(( main > held ? main : held ))

cluster-test: sync  ## the fault suite on a private 3-node RabbitMQ cluster (minutes; needs rabbitmq-server)
	$(RUN) pytest -s -p no:cacheprovider --durations=10 tests/test_cluster.py

lint: sync  ## ruff, mypy (strict on libs/), contract compatibility, AsyncAPI freshness
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy libs
	$(RUN) eventctl contracts check
	$(RUN) python -m tributary.contracts.asyncapi
	$(RUN) pytest -q -p no:cacheprovider tests/test_compose.py

fmt: sync  ## format and autofix
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

contracts: sync  ## regenerate contracts/asyncapi.yaml, the broker definitions and deploy/k8s's generated files from the catalog
	$(RUN) python -m tributary.contracts.asyncapi --write
	$(RUN) eventctl broker definitions --name-prefix '' --out deploy/rabbitmq/definitions.json
	$(MAKE) --no-print-directory k8s

k8s: sync  ## regenerate the broker's Kubernetes objects and the KEDA ScaledObjects from the catalog
	$(RUN) eventctl k8s topology --out deploy/k8s/base/rabbitmq/topology.yaml
	$(RUN) eventctl k8s autoscaling --out deploy/k8s/base/autoscaling/autoscaling.yaml

k8s-check: sync  ## render and validate deploy/k8s against the Kubernetes and operators' schemas (no cluster)
	$(RUN) pytest -q -p no:cacheprovider tests/test_k8s.py libs/eventctl/tests/test_k8s_resources.py

dev: sync  ## every service as a local process (RABBITMQ_URL or a local broker; DB=postgres for PostgreSQL)
	$(RUN) python scripts/dev.py $(if $(DB),--database $(DB))

token:  ## print an admin access token (TOKEN=$$(make -s token); needs make dev running)
	@python3 scripts/access_token.py

demo:  ## the whole stack in Docker: docker compose up --build (secrets made into .env)
	@python3 scripts/local_secrets.py ensure-compose-env
	docker compose up --build

demo-down:  ## stop the demo stack (docker compose down -v also deletes its data)
	docker compose down

compose-check: sync  ## validate docker-compose.yml with the real Compose v2 (no Docker engine needed)
	$(RUN) pytest -q -p no:cacheprovider tests/test_compose.py

# make bench [QUICK=1] [BENCH_WRITE=bench/RESULTS.md]: each benchmark, one after another, prints
# its Markdown section (commit, time, load, versions, settings, figures with their CPU);
# BENCH_WRITE puts each section between its markers in that file; QUICK=1 passes --quick.
# One entry per section of bench/RESULTS.md: the module and its arguments.
BENCHES := messaging_bench \
	signup_bench \
	"signup_bench --profile" \
	"rss_bench --reads 300 --checkpoints 2000,10000,30000 --base 4b6684b" \
	signup_ab \
	onboarding_bench \
	"email_bench -n 2000" \
	sqlite_sync_bench \
	sqlite_driver_bench \
	runtime_costs_bench \
	"spread -k 3 bench.runtime_costs_bench" \
	"notification_bench -n 3000" \
	"projection_bench -n 3000" \
	growth_bench
bench: sync  ## benchmarks: each prints its section of bench/RESULTS.md (BENCH_WRITE=file writes them, QUICK=1 smoke)
	@failed=""; for entry in $(BENCHES); do \
		set -- $$entry; name=$$1; shift; \
		if [ "$$name" = spread ]; then quick=$(if $(QUICK),"-- --quick"); else quick=$(if $(QUICK),--quick); fi; \
		echo "== python -m bench.$$entry"; \
		$(UV) run --frozen --group bench python -m bench.$$name \
			$(if $(BENCH_WRITE),--write $(BENCH_WRITE)) "$$@" $$quick || failed="$$failed [$$entry]"; \
	done; \
	if [ -n "$$failed" ]; then echo "== failed:$$failed"; exit 1; fi

# make chaos SEED=42 DB=sqlite SIGNUPS=1000 FAULTS=8 KINDS=kill,smtp_pause PROFILE=quick
chaos: sync  ## chaos soak: 5,000 sign-ups under seeded faults, then every invariant checked
	$(RUN) python -m tests.chaos --profile $(or $(PROFILE),soak) --database $(or $(DB),both) \
		$(if $(SIGNUPS),--signups $(SIGNUPS)) $(if $(FAULTS),--faults $(FAULTS)) \
		$(if $(KINDS),--kinds $(KINDS)) $(if $(SEED),--seed $(SEED))
