#!/usr/bin/env bash
# One database per service, created by the postgres image on its first start (an empty data
# directory): it runs every script in /docker-entrypoint-initdb.d once. Names follow
# <SERVICE>_DATABASE_URL in docker-compose.yml; services create their own tables (migrations).
set -euo pipefail

databases="${TRIBUTARY_DATABASES:-identity onboarding email audit notification billing payment_provider}"

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

# The audit log's two roles: audit_owner owns the database and its tables (the migrations run
# as it); audit_app is what the service connects as. At start-up the service, as the owner,
# grants audit_app INSERT and SELECT on the log and what the runtime tables need, nothing
# more: it cannot UPDATE, DELETE or TRUNCATE entries, nor drop the append-only triggers.
# Demo passwords; set AUDIT_OWNER_PASSWORD and AUDIT_APP_PASSWORD (and the URLs) elsewhere.
if [[ " $databases " == *" audit "* ]]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
        --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        --set owner_password="${AUDIT_OWNER_PASSWORD:-audit_owner}" \
        --set app_password="${AUDIT_APP_PASSWORD:-audit_app}" <<'SQL'
SELECT 'CREATE ROLE audit_owner LOGIN NOSUPERUSER'
    WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_owner') \gexec
SELECT 'CREATE ROLE audit_app LOGIN NOSUPERUSER'
    WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_app') \gexec
ALTER ROLE audit_owner PASSWORD :'owner_password';
ALTER ROLE audit_app PASSWORD :'app_password';
ALTER DATABASE audit OWNER TO audit_owner;
SQL
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
        --username "${POSTGRES_USER:-postgres}" --dbname audit \
        <<<'ALTER SCHEMA public OWNER TO audit_owner'
    echo "init-databases: audit roles audit_owner (tables) and audit_app (service)"
fi
