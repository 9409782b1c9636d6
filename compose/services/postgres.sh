#!/bin/sh
# PostgreSQL, the example target of dynamic credentials: on first start, a cluster whose
# superuser password is the postgres-admin secret, the role Vault manages credentials with
# (airlock_vault, password from its secret) and its database with one table.
set -eu
export PGDATA=/var/lib/postgresql/data
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  tr -d '\n' </run/secrets/postgres-admin.password >"$pwfile"
  chown postgres "$pwfile"
  as_postgres "$bin/initdb" -D "$PGDATA" -U postgres --pwfile="$pwfile" \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  as_postgres "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  as_postgres psql -q -v ON_ERROR_STOP=1 -d postgres \
    -v password="$(cat /run/secrets/postgres-vault.password)" <<'SQL'
CREATE ROLE airlock_vault LOGIN CREATEROLE PASSWORD :'password';
GRANT pg_signal_backend TO airlock_vault;
CREATE DATABASE airlock OWNER airlock_vault;
\connect airlock
SET ROLE airlock_vault;
CREATE TABLE incidents (id serial PRIMARY KEY, service text NOT NULL, opened date NOT NULL);
INSERT INTO incidents (service, opened) VALUES ('checkout', DATE '2026-11-01');
SQL
  as_postgres "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$PGDATA" \
  -c listen_addresses='*'
