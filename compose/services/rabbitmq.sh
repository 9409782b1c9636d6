#!/bin/sh
# RabbitMQ with Airlock's vhost and a user per component: the front door may publish to the
# task exchange but read no queue (it can never take a task); workers may do all. The guest
# user is removed. Ready (for the health check) once the users are in place.
set -eu
ready=/tmp/airlock-ready
rm -f "$ready"
rabbitmq-server &
server=$!
trap 'rabbitmqctl -q stop >/dev/null 2>&1 || kill "$server"; wait "$server"; exit 0' TERM INT
until rabbitmqctl -q await_startup >/dev/null 2>&1; do
  kill -0 "$server" 2>/dev/null || exit 1
  sleep 1
done
rabbitmqctl -q list_vhosts | grep -qx airlock || rabbitmqctl -q add_vhost airlock
for component in api worker; do
  password=$(cat "/run/secrets/rabbitmq/$component.password")
  rabbitmqctl -q add_user "airlock-$component" "$password" >/dev/null 2>&1 \
    || rabbitmqctl -q change_password "airlock-$component" "$password" >/dev/null
done
rabbitmqctl -q set_permissions -p airlock airlock-api '.*' '.*' '^airlock\.tasks$' >/dev/null
rabbitmqctl -q set_permissions -p airlock airlock-worker '.*' '.*' '.*' >/dev/null
rabbitmqctl -q delete_user guest >/dev/null 2>&1 || true
touch "$ready"
wait "$server"
