#!/bin/sh
# Redis with Airlock's users. The first start writes an ACL file with the admin user alone
# (its password from the admin secret) and the password-less default user off; the setup
# service then adds one user per component, which Redis saves to the same file.
set -eu
acl=/data/users.acl
if [ ! -s "$acl" ]; then
  hash=$(tr -d '\n' </run/secrets/redis/admin.password | sha256sum | cut -d' ' -f1)
  umask 077
  printf 'user default off resetchannels -@all\nuser airlock-admin on #%s ~* &* +@all\n' \
    "$hash" >"$acl"
fi
exec redis-server --bind 0.0.0.0 --port 6379 --protected-mode no --dir /data \
  --aclfile "$acl" --appendonly yes --save ''
