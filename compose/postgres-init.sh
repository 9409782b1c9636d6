#!/bin/sh
# The role Vault's database engine manages PostgreSQL with, and the example data agents read.
set -eu
psql -v ON_ERROR_STOP=1 -U postgres -d airlock <<SQL
CREATE ROLE airlock_vault LOGIN CREATEROLE PASSWORD '${AIRLOCK_VAULT_PASSWORD}';
GRANT pg_signal_backend TO airlock_vault;
ALTER DATABASE airlock OWNER TO airlock_vault;
SQL
psql -v ON_ERROR_STOP=1 -U airlock_vault -d airlock <<SQL
CREATE TABLE IF NOT EXISTS incidents (id serial PRIMARY KEY, service text NOT NULL, opened date NOT NULL);
SQL
