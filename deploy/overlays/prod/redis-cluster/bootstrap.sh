#!/bin/sh
# Forms the Redis Cluster, or checks and mends it: the redis-cluster-bootstrap Job's command (POSIX
# sh, busybox in redis:alpine). Idempotent: every `kubectl apply` may run it again, as may you.
#
# 1. Waits until every pod of the StatefulSet resolves (the headless Service publishes not-ready
#    pods) and answers PING with the password (up to REDIS_BOOTSTRAP_TIMEOUT seconds).
# 2. Asks each node what it knows (CLUSTER INFO, DBSIZE), then:
#    - no node sees any slot assigned: the cluster does not exist yet. If no node holds a key,
#      nodes that already met others (a bootstrap interrupted half-way) are reset, and
#      `redis-cli --cluster create ... --cluster-replicas N` forms it. If a node holds keys, it
#      stops: a node with data but no cluster is for a person to look at.
#    - the cluster exists: its members that the others lost track of (new IPs after a restart) are
#      met again (CLUSTER MEET, only nodes that know the same cluster), and empty nodes (a pod that
#      lost its volume, or a StatefulSet scaled out) join as replicas of the master with the fewest
#      (`redis-cli --cluster add-node --cluster-slave`). Masters are never added or resharded here
#      (deploy/README.md, "Scale").
# 3. Waits until every node reports cluster_state:ok, knows all the others over a live link, sees
#    each in the role (master, or replica of which master) that node reports of itself, and every
#    replica's link to its master is up (the first sync done), and prints
#    `redis-cli --cluster check`. Exits non-zero if that does not happen in time (the Job retries).
#
# Settings (env):
#   REDIS_CLUSTER_SIZE       pods in the StatefulSet (kustomize copies spec.replicas here)
#   REDIS_CLUSTER_REPLICAS   replicas per master when creating (1: 6 pods = 3 masters + 3 replicas)
#   REDIS_STATEFULSET, REDIS_HEADLESS_SERVICE, POD_NAMESPACE
#                            make the node names <sts>-<i>.<headless>.<namespace>.svc
#   REDIS_NODES              or the node names themselves, space-separated (the tests use this)
#   REDIS_PORT (6379), REDIS_AUTH_DIR (/etc/redis-auth), REDIS_BOOTSTRAP_TIMEOUT (900)
set -eu

log() { echo "bootstrap.sh: $*" >&2; }
die() { log "$*"; exit 1; }

port=${REDIS_PORT:-6379}
replicas=${REDIS_CLUSTER_REPLICAS:-1}
auth_dir=${REDIS_AUTH_DIR:-/etc/redis-auth}
timeout=${REDIS_BOOTSTRAP_TIMEOUT:-900}

if [ -n "${REDIS_NODES:-}" ]; then
  hosts=$REDIS_NODES
else
  size=${REDIS_CLUSTER_SIZE:?REDIS_CLUSTER_SIZE must be set}
  sts=${REDIS_STATEFULSET:-redis}
  headless=${REDIS_HEADLESS_SERVICE:-redis-headless}
  ns=${POD_NAMESPACE:?POD_NAMESPACE must be set (downward API metadata.namespace)}
  hosts=""
  i=0
  while [ "$i" -lt "$size" ]; do
    hosts="$hosts $sts-$i.$headless.$ns.svc"
    i=$((i + 1))
  done
fi
# shellcheck disable=SC2086 # word splitting on purpose: a list of names
set -- $hosts
size=$#
[ "$size" -ge $((3 * (replicas + 1))) ] ||
  die "$size nodes are too few for 3 masters with $replicas replica(s) each"

[ -r "$auth_dir/password" ] || die "no $auth_dir/password: create the Secret chipgate-redis-auth first"
REDISCLI_AUTH=$(cat "$auth_dir/password")
export REDISCLI_AUTH

# cli IP ARGS...: one command to the node at IP, its answer (errors too) on stdout.
cli() { h=$1; shift; redis-cli --no-auth-warning -h "$h" -p "$port" "$@" 2>&1 | tr -d '\r'; }
# info IP FIELD: a field of CLUSTER INFO.
info() { cli "$1" cluster info | awk -F: -v k="$2" '$1 == k { print $2 }'; }
resolve() {
  if command -v getent >/dev/null 2>&1; then
    getent hosts "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'
  else
    # busybox nslookup: the answer's "Address:" lines follow "Name:" (the server's come before).
    nslookup "$1" 2>/dev/null | awk '/^Name:/ { n = 1 } n && /^Address/ { print $NF; exit }'
  fi
}
deadline=$(($(date +%s) + timeout))
expired() { [ "$(date +%s)" -ge "$deadline" ]; }

# --- 1. Every node up --------------------------------------------------------------------------------
ips=""
for h in "$@"; do
  while :; do
    ip=$(resolve "$h" || true)
    if [ -n "$ip" ] && [ "$(cli "$ip" ping)" = PONG ]; then
      break
    fi
    expired && die "$h did not answer PING within ${timeout}s (resolved to '${ip:-nothing}')"
    sleep 2
  done
  log "$h is up at $ip"
  ips="$ips $ip"
done
# shellcheck disable=SC2086
set -- $ips

# --- 2. Survey -----------------------------------------------------------------------------------------
members=""   # nodes that see slots assigned: the cluster exists
met=""       # nodes that know other nodes but no slots (a create interrupted half-way)
empty=""     # nodes alone and without keys
anchor=""    # a member whose cluster state is ok, else any member
anchor_state=""
for ip in "$@"; do
  assigned=$(info "$ip" cluster_slots_assigned)
  known=$(info "$ip" cluster_known_nodes)
  keys=$(cli "$ip" dbsize)
  case "$assigned:$known:$keys" in
    *[!0-9:]* | :* | *::* | *:) die "unexpected answers from $ip: slots '$assigned', nodes '$known', keys '$keys'" ;;
  esac
  if [ "$assigned" -gt 0 ]; then
    members="$members $ip"
    state=$(info "$ip" cluster_state)
    if [ -z "$anchor" ] || { [ "$anchor_state" != ok ] && [ "$state" = ok ]; }; then
      anchor=$ip
      anchor_state=$state
    fi
  elif [ "$keys" -gt 0 ]; then
    die "$ip holds $keys keys but is in no cluster: not touching it (inspect it, FLUSHALL if it is junk, run again)"
  elif [ "$known" -gt 1 ]; then
    met="$met $ip"
  else
    empty="$empty $ip"
  fi
done

if [ -z "$members" ]; then
  # --- 3a. Create -------------------------------------------------------------------------------------
  for ip in $met; do
    log "$ip met other nodes but no slot is assigned anywhere (an interrupted bootstrap): CLUSTER RESET HARD"
    [ "$(cli "$ip" cluster reset hard)" = OK ] || die "CLUSTER RESET HARD on $ip failed"
  done
  addresses=""
  for ip in "$@"; do
    addresses="$addresses $ip:$port"
  done
  log "creating the cluster:$addresses with $replicas replica(s) per master"
  # shellcheck disable=SC2086
  redis-cli --no-auth-warning --cluster create $addresses --cluster-replicas "$replicas" --cluster-yes ||
    die "redis-cli --cluster create failed"
  anchor=$1
else
  # --- 3b. Mend -----------------------------------------------------------------------------------------
  anchor_id=$(cli "$anchor" cluster myid)
  log "the cluster exists (anchor $anchor, node $anchor_id)"
  ids=""
  for ip in "$@"; do
    id=$(cli "$ip" cluster myid)
    case $id in
      *[!0-9a-f]* | '') die "CLUSTER MYID on $ip answered '$id'" ;;
    esac
    ids="$ids $id"
  done
  view=$(cli "$anchor" cluster nodes)
  for ip in $members $met; do
    [ "$ip" = "$anchor" ] && continue
    # Connected at this IP already, as seen from the anchor?
    if echo "$view" | awk -v a="$ip:$port@" '$2 ~ "^" a && $8 == "connected" { found = 1 } END { exit !found }'; then
      continue
    fi
    if cli "$ip" cluster nodes | awk -v id="$anchor_id" '$1 == id { found = 1 } END { exit !found }'; then
      log "$ip knows the cluster but the anchor does not see it there: CLUSTER MEET"
      cli "$anchor" cluster meet "$ip" "$port" >/dev/null
    else
      die "$ip serves slots but does not know node $anchor_id: two different clusters? not touching them"
    fi
  done
  # Nodes the cluster remembers that are none of the pods: a pod that lost its volume came back as a
  # new node, and its old identity stays in every node's table (failed) until it is forgotten. A
  # forgotten replica is nothing lost; a lost identity that is still a master with slots means that
  # shard has no copy left, which is for a person to decide (deploy/README.md, "Failover"). Nodes in
  # handshake are the MEETs above in progress (a random id until the peer answers): left alone.
  ghosts=$(cli "$anchor" cluster nodes | awk -v ids="$ids" '
    BEGIN { n = split(ids, a, " "); for (i = 1; i <= n; i++) mine[a[i]] = 1 }
    NF >= 8 && !($1 in mine) && $3 !~ /handshake/ { print $1 "," $3 "," (NF - 8) }')
  for ghost in $ghosts; do
    id=${ghost%%,*}
    slots=${ghost##*,}
    flags=${ghost#*,}
    flags=${flags%,*}
    case $flags in
      *master*)
        [ "$slots" -eq 0 ] ||
          die "node $id ($flags) is no pod's any more but still owns slots: that shard has no live copy; not forgetting it" ;;
    esac
    log "forgetting node $id ($flags): no pod has it any more"
    for ip in "$@"; do
      cli "$ip" cluster forget "$id" >/dev/null || true
    done
  done
  for ip in $empty; do
    log "$ip is empty: adding it as a replica"
    redis-cli --no-auth-warning --cluster add-node "$ip:$port" "$anchor:$port" --cluster-slave ||
      die "adding $ip as a replica failed"
  done
fi

# --- 4. Wait until every node agrees ---------------------------------------------------------------------
# role_of: a CLUSTER NODES line's node id, role and master ("<id>,master,-" or "<id>,slave,<master id>").
role_of='{ r = ($3 ~ /slave/) ? "slave" : "master"; print $1 "," r "," (r == "slave" ? $4 : "-") }'
while :; do
  pending=""
  # What each node says of itself. A node learns that a peer changed role (a master turned replica by
  # `--cluster create`'s CLUSTER REPLICATE, a failover) only from that peer's next ping, a few
  # seconds later: until every node's view matches these, some node still tells clients (CLUSTER
  # SHARDS, a redirect) an old topology, so the cluster is not formed yet.
  truth=""
  for ip in "$@"; do
    truth="$truth $(cli "$ip" cluster nodes | awk "\$3 ~ /myself/ $role_of")"
  done
  for ip in "$@"; do
    state=$(info "$ip" cluster_state)
    known=$(info "$ip" cluster_known_nodes)
    repl=$(cli "$ip" info replication)
    link=$(echo "$repl" | awk -F: '$1 == "master_link_status" { print $2 }')
    if [ "$link" = down ]; then
      # Replicating from its master's old IP? (the bus learnt the new one, replication did not:
      # see repoint in probe.sh, which every replica's readiness probe also runs)
      master_host=$(echo "$repl" | awk -F: '$1 == "master_host" { print $2 }')
      master_id=$(cli "$ip" cluster nodes | awk '$3 ~ /myself/ { print $4 }')
      master_ip=$(cli "$ip" cluster nodes | awk -v id="$master_id" '$1 == id { split($2, a, "@"); sub(/:[0-9]+$/, "", a[1]); print a[1] }')
      if [ -n "$master_ip" ] && [ "$master_ip" != "$master_host" ] && [ "$master_id" != "-" ]; then
        log "$ip replicates from $master_host but its master is at $master_ip: CLUSTER REPLICATE"
        cli "$ip" cluster replicate "$master_id" >/dev/null
      fi
    fi
    # cluster_state stays ok for a while even if a node reaches nobody (failing a node takes a
    # majority's reports), so also ask for a live bus link to every peer.
    view=$(cli "$ip" cluster nodes)
    down=$(echo "$view" | awk '$8 != "connected" || $3 ~ /fail|noaddr|handshake/ { n++ } END { print n + 0 }')
    # Peers this node sees in another role (or replicating another master) than they say they are in.
    stale=$(echo "$view" | awk "$role_of" | awk -v truth="$truth" '
      BEGIN { n = split(truth, a, " "); for (i = 1; i <= n; i++) { split(a[i], f, ","); said[f[1]] = a[i] } }
      { split($0, f, ","); if ((f[1] in said) && said[f[1]] != $0) s++ } END { print s + 0 }')
    if [ "$state" != ok ] || [ "$known" != "$size" ] || [ "$down" != 0 ] || [ "$stale" != 0 ] ||
      { [ -n "$link" ] && [ "$link" != up ]; }; then
      pending="$pending $ip(state=${state:-?},nodes=${known:-?},down=$down,stale roles=$stale${link:+,replica link=$link})"
    fi
  done
  [ -z "$pending" ] && break
  expired && die "the cluster did not settle within ${timeout}s:$pending"
  log "waiting for:$pending"
  sleep 2
done
redis-cli --no-auth-warning --cluster check "$anchor:$port" >&2 || die "redis-cli --cluster check found problems"
log "the cluster is formed: $size nodes, all slots served, every replica in sync"
