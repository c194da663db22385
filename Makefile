# Tributary: the commands. `make test` works on a fresh machine with only Python and make.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, or installed into the current Python on first use.
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen

.PHONY: help sync test lint fmt contracts dev token demo demo-down compose-check bench chaos

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

sync:  ## install the workspace (uv installed if missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet

test: sync  ## the whole test suite (finds or starts RabbitMQ and PostgreSQL)
	$(RUN) pytest

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

contracts: sync  ## regenerate contracts/asyncapi.yaml and deploy/rabbitmq/definitions.json from the catalog
	$(RUN) python -m tributary.contracts.asyncapi --write
	$(RUN) eventctl broker definitions --name-prefix '' --out deploy/rabbitmq/definitions.json

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

bench: sync  ## benchmarks (not tests: figures and ratios, recorded in bench/RESULTS.md)
	$(UV) run --frozen --group bench python -m bench.messaging_bench
	$(UV) run --frozen --group bench python -m bench.signup_bench
	$(UV) run --frozen --group bench python -m bench.sqlite_sync_bench
	$(UV) run --frozen --group bench python -m bench.notification_bench

# make chaos SEED=42 DB=sqlite SIGNUPS=1000 FAULTS=8 KINDS=kill,smtp_pause PROFILE=quick
chaos: sync  ## chaos soak: 5,000 sign-ups under seeded faults, then every invariant checked
	$(RUN) python -m tests.chaos --profile $(or $(PROFILE),soak) --database $(or $(DB),both) \
		$(if $(SIGNUPS),--signups $(SIGNUPS)) $(if $(FAULTS),--faults $(FAULTS)) \
		$(if $(KINDS),--kinds $(KINDS)) $(if $(SEED),--seed $(SEED))
