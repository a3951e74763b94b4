#!/usr/bin/env bash
# Makes the Redis credentials of the prod overlay (in-cluster Redis Cluster): a fresh random password
# for the Redis administrator (the default user: probes, the bootstrap Job, replication) and one for
# each service's own ACL user, then prints the four Secrets as YAML:
#
#   chipgate-redis-auth       password (admin), users.acl (the services' users, passwords as SHA-256)
#   chipgate-licensing-redis  password (licensing's)     each mounted in its service only, at
#   chipgate-inventory-redis  password (inventory's)     /etc/chipgate/redis/password
#   chipgate-orders-redis     password (orders')         (CHIPGATE_REDIS_PASSWORD_FILE)
#
#   deploy/redis-cluster-secrets.sh | kubectl -n chipgate apply -f -
#   deploy/redis-cluster-secrets.sh --files DIR     # write the files to DIR instead (no kubectl needed)
#
# Redis never sees a service's password in clear: users.acl holds only its SHA-256 (`#<hex>`), so the
# Redis pods can't impersonate a service and the services can't read each other's passwords. Each user
# may touch only its own keys (deploy/README.md, "Redis access control"); the rules are below, in one
# place. Re-running makes new passwords: for a rotation without downtime see the README.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

files=""
case "${1:-}" in
  "") ;;
  --files) [ $# -eq 2 ] || usage; files=$2 ;;
  *) usage ;;
esac

# 48 hex digits (192 bits) from the kernel's CSPRNG: no quoting needed anywhere (redis.conf, URLs).
new_password() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
  else
    printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1
  fi
}

# What every service's user may run: everything but administration, dangerous commands (KEYS,
# FLUSHALL, CONFIG, DEBUG, ...), pub/sub and script/function management; INFO is back in (the
# services read `INFO memory`; Redis files INFO under @dangerous). Scripts (EVAL/EVALSHA) run with
# the caller's key permissions, so a script can't reach past them either.
commands='+@all -@admin -@dangerous -@pubsub -function -fcall -fcall_ro -script|flush -script|kill -script|debug +info'
# Key patterns (`~` read/write, `%R~` read only). They assume what chipgate's keys look like: every key
# starts with its service's hash tag, `{lic`, `{inv` or `{ord`, whole space or partition (`{lic}:app:7`,
# `{inv:H200}:stock`, `{ord:H200}:events`). Across services only the contract (crates/contract) is
# read: the catalogue (each product's `{inv:<sku>}:product` and the index `{inv}:products`) by
# licensing and orders, licensing's list of products with a partition (`{lic}:products`) by orders,
# and the event streams (`{lic}:events`, each product's `{lic:<sku>}:events` and `{inv:<sku>}:events`)
# by orders' consumer group (XREADGROUP and XACK write to the group, so orders needs write access there).
declare -A keys=(
  [licensing]='~{lic* %R~{inv*}:product %R~{inv}:products'
  [inventory]='~{inv*'
  [orders]='~{ord* %R~{inv*}:product %R~{inv}:products %R~{lic}:products ~{lic*}:events ~{inv*}:events'
)
services=(licensing inventory orders)

admin=$(new_password)
declare -A password
acl="# chipgate's Redis users, one per service (made by deploy/redis-cluster-secrets.sh). The default
# user (the administrator) is not here: its password is the Secret's \"password\" key.
"
for svc in "${services[@]}"; do
  password[$svc]=$(new_password)
  acl+="user $svc on #$(sha256 "${password[$svc]}") resetkeys ${keys[$svc]} resetchannels $commands
"
done

if [ -n "$files" ]; then
  umask 077
  mkdir -p "$files/redis-auth"
  printf '%s' "$admin" >"$files/redis-auth/password"
  printf '%s' "$acl" >"$files/redis-auth/users.acl"
  for svc in "${services[@]}"; do
    mkdir -p "$files/$svc"
    printf '%s' "${password[$svc]}" >"$files/$svc/password"
  done
  echo "wrote $files/redis-auth/password, $files/redis-auth/users.acl and $files/<service>/password" >&2
  exit 0
fi

command -v kubectl >/dev/null 2>&1 || { echo "kubectl is needed to print the Secrets (or use --files DIR)" >&2; exit 1; }
secret() { # NAME KEY=VALUE...
  local name=$1
  shift
  local args=()
  for kv in "$@"; do args+=("--from-literal=$kv"); done
  kubectl create secret generic "$name" "${args[@]}" --dry-run=client -o yaml
}
secret chipgate-redis-auth "password=$admin" "users.acl=$acl"
for svc in "${services[@]}"; do
  echo "---"
  secret "chipgate-$svc-redis" "password=${password[$svc]}"
done
