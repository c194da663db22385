#!/usr/bin/env bash
# One database per service, created by the postgres image on its first start (an empty data
# directory): it runs every script in /docker-entrypoint-initdb.d once. Names follow
# <SERVICE>_DATABASE_URL in docker-compose.yml; services create their own tables (migrations).
set -euo pipefail

databases="${TRIBUTARY_DATABASES:-identity onboarding email audit notification billing}"

for db in $databases; do
    exists="$(psql -v ON_ERROR_STOP=1 --no-psqlrc --tuples-only --no-align \
        --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        --set db="$db" <<<"SELECT 1 FROM pg_database WHERE datname = :'db'")"
    if [[ "$exists" == 1 ]]; then
        echo "init-databases: $db exists"
    else
        psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
            --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
            --set db="$db" <<<'CREATE DATABASE :"db"'
        echo "init-databases: created $db"
    fi
done
