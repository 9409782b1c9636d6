#!/bin/sh
# A worker host of its own: its own Docker engine, egress gateway and worker, joined to a
# stack over the network alone (Redis, RabbitMQ and Vault by address). It serves its own
# queue (AIRLOCK_HOST_QUEUE). Stopped, its worker lets the tasks in flight run for
# AIRLOCK_DRAIN_S and cancels those left (containers stopped, credentials revoked, records
# final) before the gateway and the engine go.
set -eu
log() { echo "worker-host: $*"; }

# The engine's runc, as the container's default seccomp profile allows it: no new session
# keyring (keyctl is refused) and no pivot_root (refused: runc moves the root and chroots
# instead; task containers drop every capability, chroot among them).
cat >/usr/local/bin/airlock-runc <<'RUNC'
#!/bin/sh
for arg; do
  shift
  set -- "$@" "$arg"
  if [ "$arg" = create ] || [ "$arg" = run ]; then set -- "$@" --no-new-keyring --no-pivot; fi
done
exec runc "$@"
RUNC
chmod 755 /usr/local/bin/airlock-runc
# Task containers need no network of the engine's (they have none): no bridge, no iptables.
cgroups="airlock-host-$(hostname)"
dockerd --add-runtime airlock-runc=/usr/local/bin/airlock-runc --default-runtime airlock-runc \
  --bridge=none --iptables=false --ip-masq=false --cgroup-parent="/$cgroups" \
  >/var/log/dockerd.log 2>&1 &
engine=$!
tries=0
until docker info >/dev/null 2>&1; do
  kill -0 "$engine" 2>/dev/null || { cat /var/log/dockerd.log >&2; exit 1; }
  tries=$((tries + 1)); [ "$tries" -lt 120 ] || { log "engine did not start" >&2; exit 1; }
  sleep 0.5
done
# The task images: files given to this host (a machine without a registry), else pulled.
for image in /airlock/images/*.tar; do
  [ -e "$image" ] && docker load -q -i "$image" >/dev/null
done
docker image inspect "$AIRLOCK_RUNNER_IMAGE" >/dev/null 2>&1 || docker pull -q "$AIRLOCK_RUNNER_IMAGE"
log "engine up: $(docker info --format '{{.ServerVersion}} {{.Driver}}'), images: $(docker images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"

stop() {
  log "stopping: worker (it cancels its tasks in flight), then gateway and engine"
  kill -TERM "$worker" 2>/dev/null || true
  wait "$worker" 2>/dev/null || true
  kill -TERM "$gateway" 2>/dev/null || true
  wait "$gateway" 2>/dev/null || true
  left=$(docker ps -aq --filter label=airlock.managed=1)
  [ -z "$left" ] || { log "removing containers left: $left"; docker rm -f $left >/dev/null; }
  kill -TERM "$engine" 2>/dev/null || true
  wait "$engine" 2>/dev/null || true
  # The engine's cgroups (its containers' below them), empty once the last shim is gone:
  # deepest first, for up to five seconds.
  tries=0
  while [ "$tries" -lt 25 ] && ls -d /sys/fs/cgroup/*/"$cgroups" >/dev/null 2>&1; do
    find /sys/fs/cgroup/*/"$cgroups" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.2
    tries=$((tries + 1))
  done
  exit 0
}
trap stop TERM INT

airlock gateway &
gateway=$!
until [ -S "$AIRLOCK_ENDPOINT_DIR/gateway.sock" ]; do
  kill -0 "$gateway" 2>/dev/null || { log "gateway exited" >&2; exit 1; }
  sleep 0.2
done
airlock worker --queue "$AIRLOCK_HOST_QUEUE" --no-beat --concurrency "${AIRLOCK_HOST_CONCURRENCY:-2}" &
worker=$!
# Waits until a signal (then `stop` runs) or the worker exits by itself.
wait "$worker" || true
stop
