#!/bin/sh
# One-shot set-up of a stack's Vault and Redis, idempotent (it runs at every `up`):
# initialises OpenBao once (its root token and recovery key go to the operator's folder),
# configures it for the agent registry, makes it the OIDC issuer of callers' tokens,
# registers each component's AppRole credentials (the secret files) and gives each
# component its Redis user.
set -eu
export VAULT_ADDR=${VAULT_ADDR:-http://vault:8200}
init=/operator/vault-init.json
if bao status -format=json 2>/dev/null | grep -q '"initialized": false'; then
  (umask 077 && bao operator init -recovery-shares=1 -recovery-threshold=1 -format=json >"$init.new")
  mv "$init.new" "$init"
  echo "setup: OpenBao initialised; root token and recovery key in the operator folder"
fi
[ -s "$init" ] || { echo "setup: OpenBao is initialised but $init is missing" >&2; exit 1; }
tries=0
until bao status >/dev/null 2>&1; do  # unsealed (the static seal does it at start)
  tries=$((tries + 1))
  [ "$tries" -lt 120 ] || { echo "setup: OpenBao stays sealed" >&2; exit 1; }
  sleep 0.5
done
VAULT_TOKEN=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["root_token"])' "$init")
export VAULT_TOKEN
airlock vault setup
airlock dev issuer
airlock dev approles /run/secrets/approle --given
airlock dev redis-users /run/secrets/redis --url redis://redis:6379/0
echo "setup: done"
