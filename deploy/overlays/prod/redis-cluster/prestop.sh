#!/bin/sh
# preStop hook of a Redis Cluster node: a master hands its role to its replica before it stops.
#
# Without this, stopping a master (rolling update, node drain) leaves its slots unserved until the
# cluster notices (cluster-node-timeout, 5 s) and elects the replica, and the writes of the last
# moment that the replica had not received are lost. With it, the replica runs CLUSTER FAILOVER (the
# coordinated kind: the master pauses its clients, the replica catches up to the master's exact
# replication offset, then takes over), so the handover loses nothing and clients are paused for
# milliseconds; they follow the MOVED redirects to the new master. Then the kubelet sends SIGTERM and
# this node, now a replica, shuts down.
#
# Bounded: gives up after REDIS_PRESTOP_TIMEOUT seconds (default 20, well inside the pod's
# terminationGracePeriodSeconds of 60) and lets the shutdown go on; a failed handover then degrades
# to an ordinary failover. Settings as probe.sh, plus REDIS_PRESTOP_TIMEOUT.
set -u

auth_dir=${REDIS_AUTH_DIR:-/etc/redis-auth}
port=${REDIS_PORT:-6379}
host=${REDIS_HOST:-127.0.0.1}
timeout=${REDIS_PRESTOP_TIMEOUT:-20}
REDISCLI_AUTH=$(cat "$auth_dir/password" 2>/dev/null || true)
export REDISCLI_AUTH

log() { echo "prestop.sh: $*" >&2; }
# cli HOST PORT ARGS...: one command, its answer (errors too) on stdout.
cli() { h=$1 p=$2; shift 2; redis-cli --no-auth-warning -h "$h" -p "$p" "$@" 2>&1 | tr -d '\r'; }

repl=$(cli "$host" "$port" info replication)
case $repl in
  *role:master*) ;;
  *) log "not a master: nothing to hand over"; exit 0 ;;
esac
# Slot ranges are the fields after the 8th of this node's CLUSTER NODES line.
myslots=$(cli "$host" "$port" cluster nodes | awk '$3 ~ /myself/ { print NF - 8 }')
if [ "${myslots:-0}" -le 0 ]; then
  log "a master without slots: nothing to hand over"
  exit 0
fi
# The first online replica, from "slaveN:ip=...,port=...,state=online,offset=...,lag=...".
replica=$(echo "$repl" | sed -n 's/^slave[0-9]*:ip=\([^,]*\),port=\([0-9]*\),state=online,.*/\1 \2/p' | head -n 1)
if [ -z "$replica" ]; then
  log "no online replica: stopping without a handover (the cluster fails over, or the shard waits)"
  exit 0
fi
# shellcheck disable=SC2086 # "ip port", split on purpose
set -- $replica
rip=$1
rport=$2
log "handing the master role to the replica at $rip:$rport"
answer=$(cli "$rip" "$rport" cluster failover)
if [ "$answer" != OK ]; then
  log "CLUSTER FAILOVER on $rip:$rport answered: $answer"
  exit 0
fi
waited=0
while [ "$waited" -lt "$timeout" ]; do
  role=$(cli "$host" "$port" info replication | awk -F: '$1 == "role" { print $2 }')
  if [ "$role" = slave ]; then
    log "handed over after ${waited}s; now a replica"
    exit 0
  fi
  sleep 1
  waited=$((waited + 1))
done
log "still a master after ${timeout}s; stopping anyway"
exit 0
