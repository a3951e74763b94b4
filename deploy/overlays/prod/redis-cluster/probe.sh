#!/bin/sh
# Readiness and liveness of a Redis Cluster node: `sh probe.sh ready` / `sh probe.sh alive`.
# Both authenticate as the default user with the password from the Secret chipgate-redis-auth
# (REDISCLI_AUTH, never on the command line).
#
#   alive  Redis answers at all: PONG, LOADING (a long AOF load must not be killed), MASTERDOWN, or
#          an authentication error. The last matters during a password rotation: the Secret's file
#          changes under a running node before the node restarts, and a liveness probe that failed on
#          it would restart every Redis pod at once.
#   ready  This node is a usable member of a healthy cluster: PONG with the current password, the
#          cluster state is ok (all slots served), and a replica has finished syncing from its
#          master. The StatefulSet rolls to the next pod only once the restarted one is ready, so a
#          rolling update never takes a shard's second copy while the first is still catching up;
#          the PodDisruptionBudget counts ready pods. Before the bootstrap Job has formed the
#          cluster no pod is ready (podManagementPolicy: Parallel, so they all start anyway).
#          One side effect, idempotent: a replica whose link is down because it still replicates
#          from its master's old IP is re-pointed (see repoint below).
#
# Settings: REDIS_AUTH_DIR (/etc/redis-auth), REDIS_PORT (6379), REDIS_HOST (127.0.0.1).
set -u

auth_dir=${REDIS_AUTH_DIR:-/etc/redis-auth}
port=${REDIS_PORT:-6379}
host=${REDIS_HOST:-127.0.0.1}
REDISCLI_AUTH=$(cat "$auth_dir/password" 2>/dev/null || true)
export REDISCLI_AUTH

cli() { redis-cli --no-auth-warning -h "$host" -p "$port" "$@" 2>&1; }

# repoint INFO_REPLICATION: a replica replicates from an IP (master_host) that Redis sets when the
# node starts or is told to replicate, while the cluster bus may learn its master's new IP later from
# gossip (a master pod that came back with a new IP), which does not move the replication link. The
# replica would then retry the dead IP for ever. So when the link is down and the master's address in
# CLUSTER NODES differs from master_host, CLUSTER REPLICATE <same master> re-points it (idempotent;
# the bootstrap Job does the same).
repoint() {
  master_host=$(echo "$1" | awk -F: '$1 == "master_host" { print $2 }')
  nodes=$(cli cluster nodes | tr -d '\r')
  master_id=$(echo "$nodes" | awk '$3 ~ /myself/ { print $4 }')
  master_ip=$(echo "$nodes" | awk -v id="$master_id" '$1 == id { split($2, a, "@"); sub(/:[0-9]+$/, "", a[1]); print a[1] }')
  if [ -n "$master_ip" ] && [ "$master_ip" != "$master_host" ] && [ "$master_id" != "-" ]; then
    echo "replicating from $master_host, but the master is at $master_ip now: CLUSTER REPLICATE $master_id"
    cli cluster replicate "$master_id" >/dev/null
  fi
}

case ${1:-} in
  alive)
    reply=$(cli ping)
    case $reply in
      *PONG* | *LOADING* | *MASTERDOWN* | *NOAUTH* | *WRONGPASS* | *"invalid username-password"*) exit 0 ;;
    esac
    echo "not alive: $reply"
    exit 1
    ;;
  ready)
    reply=$(cli ping)
    [ "$reply" = PONG ] || { echo "not ready: PING answered $reply"; exit 1; }
    state=$(cli cluster info | tr -d '\r' | awk -F: '$1 == "cluster_state" { print $2 }')
    [ "$state" = ok ] || { echo "not ready: cluster_state ${state:-unknown}"; exit 1; }
    repl=$(cli info replication | tr -d '\r')
    case $repl in
      *role:slave*)
        if ! echo "$repl" | grep -q '^master_link_status:up$'; then
          repoint "$repl"
          echo "not ready: replica's link to its master is down"
          exit 1
        fi
        echo "$repl" | grep -q '^master_sync_in_progress:0$' || { echo "not ready: replica still syncing"; exit 1; }
        ;;
    esac
    exit 0
    ;;
  *)
    echo "usage: probe.sh alive|ready" >&2
    exit 2
    ;;
esac
