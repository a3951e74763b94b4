"""The prod overlay's Redis Cluster scripts (deploy/overlays/prod/redis-cluster/*.sh) and credentials
(deploy/redis-cluster-secrets.sh), run for real against six local redis-server processes.

Each node gets its own loopback address (127.0.0.x) and the same port, as pods get their own IP and
the same port, and a name like the pod's (redis-<i>.redis-headless.chipgate-test.svc) that a stand-in
`getent` on PATH resolves from a hosts file: so "a pod restarts with a new IP" is a hosts-file edit.
The nodes run with the prod redis.conf (only bind, port and dir changed), started by start.sh exactly
as the container's command starts them; bootstrap.sh, probe.sh and prestop.sh run as the Job and the
kubelet run them. Redis' own processes only, on loopback, in a temporary directory; bounded waits.

Needs redis-server and redis-cli (Redis >= 7.0) on PATH; missing ones are a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import k8s  # noqa: E402

SCRIPTS = k8s.DEPLOY / "overlays" / "prod" / "redis-cluster"
PROD_CONF = k8s.DEPLOY / "overlays" / "prod" / "redis.conf"
SECRETS_SCRIPT = k8s.DEPLOY / "redis-cluster-secrets.sh"
SIZE = 6
NAMESPACE = "chipgate-test"
FAKE_GETENT = """#!/bin/sh
# Stand-in for getent: answers `getent hosts NAME` from $FAKE_HOSTS ("IP NAME" lines).
[ "$1" = hosts ] || exit 2
awk -v n="$2" '$2 == n { print; found = 1 } END { exit !found }' "$FAKE_HOSTS"
"""


def hostname(i: int) -> str:
    return f"redis-{i}.redis-headless.{NAMESPACE}.svc"


def free_port(ips: list[str]) -> int:
    """A port free on every address, whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            for ip in ips:
                for p in (port, port + 10000):
                    with socket.socket() as s:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind((ip, p))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair found")


class Cluster:
    """Six nodes started by start.sh, each in its own directory, with an address per generation."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        getent = self.bin / "getent"
        getent.write_text(FAKE_GETENT)
        getent.chmod(0o755)
        self.hosts = root / "hosts"
        self.secrets = root / "secrets"
        subprocess.run(["bash", str(SECRETS_SCRIPT), "--files", str(self.secrets)], check=True,
                       capture_output=True, text=True, timeout=60)
        self.auth = self.secrets / "redis-auth"
        self.password = (self.auth / "password").read_text()
        self.generation = 1
        self.ips = [self.ip(i) for i in range(SIZE)]
        self.port = free_port([self.ip(i, g) for g in (1, 2, 3) for i in range(SIZE)])
        self.procs: dict[int, subprocess.Popen] = {}
        self.write_hosts()

    @staticmethod
    def ip(i: int, generation: int = 1) -> str:
        return f"127.0.{10 + generation}.{10 + i}"

    def write_hosts(self):
        self.hosts.write_text("".join(f"{ip} {hostname(i)}\n" for i, ip in enumerate(self.ips)))

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(PATH=f"{self.bin}:{env['PATH']}", FAKE_HOSTS=str(self.hosts), REDIS_AUTH_DIR=str(self.auth),
                   REDIS_PORT=str(self.port))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def node_dir(self, i: int) -> Path:
        d = self.root / f"node-{i}"
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "run").mkdir(exist_ok=True)
        return d

    def start(self, i: int):
        d = self.node_dir(i)
        # The prod config as it is, but for this node's address, port and data directory.
        conf = PROD_CONF.read_text()
        for old, new in (("bind 0.0.0.0", f"bind {self.ips[i]}"), ("port 6379", f"port {self.port}"),
                         ("cluster-port 16379", f"cluster-port {self.port + 10000}"), ("dir /data", f"dir {d / 'data'}")):
            assert f"\n{old}\n" in conf, old
            conf = conf.replace(f"\n{old}\n", f"\n{new}\n")
        # One host, many loopback addresses: without this, connections between nodes would leave from
        # 127.0.0.1 and each node would learn that as its own address (a pod has one IP; no such issue).
        conf += f"bind-source-addr {self.ips[i]}\n"
        (d / "redis.conf").write_text(conf)
        log = open(d / "redis.log", "ab")
        self.procs[i] = subprocess.Popen(
            ["sh", str(SCRIPTS / "start.sh")], stdout=log, stderr=subprocess.STDOUT,
            env=self.env(POD_NAME=f"redis-{i}", POD_NAMESPACE=NAMESPACE, POD_IP=self.ips[i],
                         REDIS_BASE_CONF=d / "redis.conf", REDIS_RUN_DIR=d / "run", REDIS_DATA_DIR=d / "data"),
        )
        log.close()
        self.wait(lambda: self.cli(i, "ping") == "PONG", f"node {i} answers PING", proc=self.procs[i])

    def stop(self, i: int):
        proc = self.procs.pop(i)
        proc.send_signal(signal.SIGTERM)  # start.sh exec'd redis-server: the server gets it
        proc.wait(timeout=30)

    def stop_all(self):
        for i in list(self.procs):
            self.stop(i)

    def cli(self, i: int, *args, user: str | None = None, password: str | None = None) -> str:
        cmd = ["redis-cli", "--no-auth-warning", "-h", self.ips[i], "-p", str(self.port)]
        if user:
            cmd += ["--user", user]
        env = dict(os.environ, REDISCLI_AUTH=password if password is not None else self.password)
        out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10, env=env)
        return (out.stdout + out.stderr).strip()

    def info(self, i: int, field: str) -> str:
        for line in self.cli(i, "cluster", "info").splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return value.strip()
        return ""

    def nodes(self, i: int) -> list[dict]:
        out = []
        for line in self.cli(i, "cluster", "nodes").splitlines():
            f = line.split()
            out.append({"id": f[0], "addr": f[1], "flags": set(f[2].split(",")), "master": f[3],
                        "link": f[7], "slots": f[8:]})
        return out

    def topology(self) -> dict:
        """{node id: (master id or '-', slot ranges)} as node 0 sees it."""
        return {n["id"]: (n["master"], tuple(n["slots"])) for n in self.nodes(0)}

    def shards(self) -> set:
        """{(slot ranges, {node ids})}: which nodes hold which slots, whichever of them is the master."""
        nodes = self.nodes(0)
        out = set()
        for m in nodes:
            if "master" in m["flags"] and m["slots"]:
                members = {m["id"]} | {n["id"] for n in nodes if n["master"] == m["id"]}
                out.add((tuple(m["slots"]), frozenset(members)))
        return out

    def node_of_ip(self) -> dict[str, int]:
        return {ip: i for i, ip in enumerate(self.ips)}

    def index_owning(self, key: str) -> int:
        """The node index serving `key` (no -c: redirects name hosts only the stand-in resolves)."""
        slot = int(self.cli(0, "cluster", "keyslot", key))
        for n in self.nodes(0):
            if "master" not in n["flags"]:
                continue
            for r in n["slots"]:
                lo, _, hi = r.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return self.node_of_ip()[n["addr"].split(":")[0]]
        raise AssertionError(f"no master serves slot {slot}")

    def paired(self) -> bool:
        """Settled, and node 0 sees three shards of a master and a replica each."""
        return self.settled() and len(self.shards()) == 3 and all(len(m) == 2 for _, m in self.shards())

    def settled(self) -> bool:
        """Every node: cluster ok, knows all six, has a live link to each at its current IP, sees each
        in its own role, and a replica's replication link is up. (A
        cluster whose nodes reach nobody still says ok for a while: failing a node takes a majority's
        reports, so cluster_state alone proves nothing.)"""
        if not all(self.info(i, "cluster_state") == "ok" and self.info(i, "cluster_known_nodes") == str(SIZE)
                   for i in range(SIZE)):
            return False
        for i in range(SIZE):
            for n in self.nodes(i):
                if n["link"] != "connected" or n["flags"] & {"fail", "fail?", "noaddr", "handshake"}:
                    return False
                if n["addr"].split(":")[0] not in self.ips:
                    return False
            repl = self.cli(i, "info", "replication")
            if "role:slave" in repl and "master_link_status:up" not in repl:
                return False
        return self.roles_agree()

    @staticmethod
    def role(n: dict) -> tuple[str, str]:
        return ("slave", n["master"]) if "slave" in n["flags"] else ("master", "-")

    def roles_agree(self) -> bool:
        """Every node sees every other in the role (master, or replica of which master) that node
        reports of itself: a role change reaches a peer only with the next ping, so until then some
        node still describes the old topology to clients."""
        views = [self.nodes(i) for i in range(SIZE)]
        said = {n["id"]: self.role(n) for view in views for n in view if "myself" in n["flags"]}
        return all(self.role(n) == said.get(n["id"]) for view in views for n in view)

    def run(self, script: str, *args, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPTS / script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env or self.env())

    def bootstrap(self) -> subprocess.CompletedProcess:
        return self.run("bootstrap.sh", env=self.env(REDIS_CLUSTER_SIZE=SIZE, POD_NAMESPACE=NAMESPACE,
                                                      REDIS_BOOTSTRAP_TIMEOUT=60))

    def probe(self, i: int, kind: str, auth_dir: Path | None = None) -> subprocess.CompletedProcess:
        return self.run("probe.sh", kind, env=self.env(REDIS_HOST=self.ips[i], REDIS_AUTH_DIR=auth_dir or self.auth),
                        timeout=30)

    @staticmethod
    def wait(check, what: str, timeout: float = 30, proc: subprocess.Popen | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{what}: the process exited with {proc.returncode}")
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout}s")


def redis_version() -> tuple[int, ...]:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    v = out.split("v=")[1].split()[0]
    return tuple(int(x) for x in v.split("."))


class RedisClusterScripts(unittest.TestCase):
    """One cluster for the class; the tests run in name order, each starting where the last left it."""

    @classmethod
    def setUpClass(cls):
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise AssertionError(f"{tool} is not on PATH (install Redis >= 7.0)")
        if redis_version() < (7, 0):
            raise AssertionError("Redis >= 7.0 is needed (cluster-announce-hostname)")
        cls.tmp = tempfile.TemporaryDirectory(prefix="chipgate-redis-cluster-")
        cls.c = Cluster(Path(cls.tmp.name))
        try:
            for i in range(SIZE):
                cls.c.start(i)
        except BaseException:
            cls.c.stop_all()
            cls.tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.c.stop_all()
        cls.tmp.cleanup()

    def test_0_nodes_need_the_password_and_are_not_ready_before_the_bootstrap(self):
        c = self.c
        self.assertIn("NOAUTH", c.cli(0, "ping", password=""))
        self.assertIn("WRONGPASS", c.cli(0, "ping", password="not-the-password"))
        self.assertEqual(c.cli(0, "ping"), "PONG")
        self.assertEqual(c.info(0, "cluster_state"), "fail")
        ready = c.probe(0, "ready")
        self.assertNotEqual(ready.returncode, 0)
        self.assertIn("cluster_state fail", ready.stdout)
        self.assertEqual(c.probe(0, "alive").returncode, 0)

    def test_1_bootstrap_forms_three_masters_with_a_replica_each(self):
        c = self.c
        out = c.bootstrap()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("creating the cluster", out.stderr)
        self.assertTrue(c.settled())
        nodes = c.nodes(0)
        masters = [n for n in nodes if "master" in n["flags"]]
        replicas = [n for n in nodes if "slave" in n["flags"]]
        self.assertEqual((len(masters), len(replicas)), (3, 3))
        self.assertTrue(all(n["slots"] for n in masters), "every master serves slots")
        self.assertEqual(sorted(r["master"] for r in replicas), sorted(m["id"] for m in masters),
                         "one replica per master")
        # Clients are told hostnames, not IPs (cluster-preferred-endpoint-type hostname): CLUSTER SHARDS
        # (all nodes) and CLUSTER SLOTS (masters; replicas once they have replicated something).
        shards = c.cli(0, "cluster", "shards").splitlines()
        endpoints = {shards[k + 1] for k, line in enumerate(shards) if line == "endpoint"}
        self.assertEqual(endpoints, {hostname(i) for i in range(SIZE)})
        # A replica is listed in CLUSTER SLOTS only once its replication offset is non-zero, which may
        # or may not have happened yet: every master must be there, and nothing but our hostnames.
        slots = c.cli(0, "cluster", "slots").splitlines()
        listed = {line for line in slots if "redis-headless" in line}
        self.assertLessEqual({hostname(c.node_of_ip()[m["addr"].split(":")[0]]) for m in masters}, listed)
        self.assertLessEqual(listed, {hostname(i) for i in range(SIZE)})
        for i in range(SIZE):
            self.assertEqual(c.probe(i, "ready").returncode, 0, f"node {i} ready")

    def test_2_bootstrap_again_changes_nothing(self):
        c = self.c
        before = c.topology()
        out = c.bootstrap()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("the cluster exists", out.stderr)
        self.assertNotIn("creating", out.stderr)
        self.assertEqual(c.topology(), before)

    def test_3_each_service_user_reaches_its_own_keys_only(self):
        c = self.c
        pw = {svc: (c.secrets / svc / "password").read_text() for svc in ("licensing", "inventory", "orders")}

        def as_(svc, *args, key=None):
            """`args` as the service's user, sent to the master of `key` (default: args[1])."""
            key = key or (args[1] if len(args) > 1 else "x")
            return c.cli(c.index_owning(key), *args, user=svc, password=pw[svc])

        # The layout of crates/contract: the catalogue is each product's {inv:SKU}:product plus the
        # index {inv}:products; inventory's events are per product, licensing's in {lic}.
        self.assertEqual(c.cli(c.index_owning("{inv:H200}:product"), "set", "{inv:H200}:product", "p"), "OK")
        self.assertEqual(as_("inventory", "set", "{inv:H200}:stock", "10"), "OK")
        self.assertEqual(as_("inventory", "zadd", "{inv}:products", "0", "H200"), "1")
        self.assertEqual(as_("licensing", "set", "{lic}:app:7", "a"), "OK")
        self.assertEqual(as_("licensing", "set", "{lic:H200}:license:lic-H200-3", "l"), "OK", "a licensing partition")
        self.assertEqual(as_("licensing", "zadd", "{lic}:products", "0", "H200"), "1")
        self.assertEqual(as_("orders", "zrange", "{lic}:products", "0", "-1"), "H200", "orders finds licensing's products")
        self.assertIn("NOPERM", as_("orders", "get", "{lic:H200}:license:lic-H200-3"), "but no licence")
        self.assertEqual(as_("licensing", "get", "{inv:H200}:product"), "p", "licensing reads the catalogue")
        self.assertEqual(as_("orders", "zrange", "{inv}:products", "0", "-1"), "H200", "orders lists the products")
        self.assertIn("NOPERM", as_("licensing", "set", "{inv:H200}:product", "x"), "but can't write it")
        self.assertIn("NOPERM", as_("licensing", "get", "{inv:H200}:stock"), "nor read inventory's other keys")
        self.assertIn("NOPERM", as_("orders", "get", "{inv:H200}:stock"))
        self.assertIn("NOPERM", as_("inventory", "get", "{lic}:app:7"))
        self.assertIn("NOPERM", as_("orders", "get", "{lic}:app:7"))
        self.assertEqual(as_("orders", "set", "{ord:H200}:order:1", "o"), "OK")
        self.assertIn("NOPERM", as_("inventory", "get", "{ord:H200}:order:1"))
        self.assertEqual(as_("orders", "get", "{inv:H200}:product"), "p")
        # orders consumes licensing's and each product's inventory events through its consumer group
        # (XGROUP/XREADGROUP write to the stream); it reads no other key of theirs.
        for stream, producer in (("{lic}:events", "licensing"), ("{lic:H200}:events", "licensing"),
                                 ("{inv:H200}:events", "inventory")):
            self.assertRegex(as_(producer, "xadd", stream, "*", "e", "1"), r"^\d+-\d+$")
            self.assertEqual(as_("orders", "xgroup", "create", stream, "orders", "0", key=stream), "OK")
            self.assertIn(stream, as_("orders", "xreadgroup", "group", "orders", "c1", "count", "1",
                                      "streams", stream, ">", key=stream))
        # Scripts run with the caller's key permissions.
        self.assertIn("NOPERM", as_("licensing", "eval", "return redis.call('get', KEYS[1])", "1", "{ord}:x", key="{ord}:x"))
        self.assertEqual(as_("licensing", "eval", "return redis.call('set', KEYS[1], 'v')", "1", "{lic}:y", key="{lic}:y"), "OK")
        for svc in pw:
            self.assertIn("NOPERM", as_(svc, "flushall"), svc)
            self.assertIn("NOPERM", as_(svc, "config", "get", "maxmemory"), svc)
            self.assertIn("NOPERM", as_(svc, "keys", "*"), svc)
            self.assertIn("used_memory:", as_(svc, "info", "memory"), f"{svc} reads INFO memory")
            self.assertIn("cluster_state:ok", as_(svc, "cluster", "info"), f"{svc} reads the topology")
            self.assertEqual(as_(svc, "wait", "1", "1000", key="x"), "1", f"{svc} may WAIT for a replica")

    def test_4_prestop_hands_a_master_over_to_its_replica(self):
        c = self.c
        master = next(n for n in c.nodes(0) if "master" in n["flags"] and n["slots"])
        i = c.node_of_ip()[master["addr"].split(":")[0]]
        out = c.run("prestop.sh", env=c.env(REDIS_HOST=c.ips[i]))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("handed over", out.stderr)
        self.assertIn("role:slave", c.cli(i, "info", "replication"))
        c.wait(c.paired, "the cluster settles after the handover, the old master a replica of the new")
        after = next(n for n in c.nodes(0) if n["id"] == master["id"])
        self.assertEqual(after["slots"], [], "the old master gave its slots away")
        # On a replica the hook does nothing.
        out = c.run("prestop.sh", env=c.env(REDIS_HOST=c.ips[i]))
        self.assertIn("not a master", out.stderr)

    def test_5_every_pod_restarting_with_a_new_ip_keeps_the_topology(self):
        c = self.c
        c.wait(c.paired, "three shards of two")
        before = c.shards()
        # Every pod at once (a node pool replaced): no node is left to remember anyone's new address.
        for proc in c.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in c.procs.values():
            proc.wait(timeout=30)
        c.procs.clear()
        c.ips = [c.ip(i, 2) for i in range(SIZE)]
        c.write_hosts()
        for i in range(SIZE):
            c.start(i)
        c.wait(c.paired, "every node back, ok and knowing all others at their new IPs", timeout=60)
        self.assertEqual(c.shards(), before, "the same nodes hold the same slots")
        self.assertEqual({n["addr"].split(":")[0] for n in c.nodes(0)}, set(c.ips))
        log = (c.root / "node-0" / "redis.log").read_text()
        self.assertIn("refreshed", log, "start.sh rewrote the stale peer IPs")

    def test_6_bootstrap_reconnects_nodes_that_restarted_before_dns_knew_their_peers(self):
        c = self.c
        c.wait(c.paired, "three shards of two")
        before = c.shards()
        for proc in c.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in c.procs.values():
            proc.wait(timeout=30)
        c.procs.clear()
        # New IPs, but DNS still answers the old ones while the pods start: start.sh can't refresh
        # anything, and every node is left knowing only dead addresses.
        old = c.ips
        c.ips = [c.ip(i, 3) for i in range(SIZE)]
        for i in range(SIZE):
            c.start(i)
        c.ips, stale = old, c.ips
        c.write_hosts()
        c.ips = stale
        time.sleep(7)  # past cluster-node-timeout: nodes now flag each other as failing
        self.assertFalse(c.settled(), "stuck without help")
        c.write_hosts()  # DNS catches up
        out = c.bootstrap()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("CLUSTER MEET", out.stderr)
        c.wait(c.paired, "every node linked to every other at its new IP")
        self.assertEqual(c.shards(), before, "the same nodes hold the same slots")

    def test_7_a_pod_that_lost_its_volume_rejoins_as_a_replica(self):
        c = self.c
        replica = next(n for n in c.nodes(0) if "slave" in n["flags"])
        i = c.node_of_ip()[replica["addr"].split(":")[0]]
        c.stop(i)
        shutil.rmtree(c.root / f"node-{i}" / "data")
        c.start(i)
        self.assertEqual(c.info(i, "cluster_known_nodes"), "1", "a new, empty node")
        out = c.bootstrap()
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("forgetting node " + replica["id"], out.stderr)
        self.assertIn("adding it as a replica", out.stderr)
        c.wait(c.paired, "the cluster settles with the new replica")
        nodes = c.nodes(0)
        self.assertNotIn(replica["id"], [n["id"] for n in nodes], "the lost identity is forgotten")
        self.assertEqual(sum("slave" in n["flags"] for n in nodes), 3)
        masters = {n["id"] for n in nodes if "master" in n["flags"]}
        self.assertEqual(sorted(n["master"] for n in nodes if "slave" in n["flags"]), sorted(masters),
                         "again one replica per master")
        c.wait(lambda: c.probe(i, "ready").returncode == 0, "the new replica is ready once synced")

    def test_8_liveness_survives_a_password_rotation_readiness_does_not(self):
        c = self.c
        rotated = c.root / "rotated"
        rotated.mkdir(exist_ok=True)
        (rotated / "password").write_text("a-new-password-not-yet-applied")
        self.assertEqual(c.probe(0, "alive", auth_dir=rotated).returncode, 0)
        self.assertNotEqual(c.probe(0, "ready", auth_dir=rotated).returncode, 0)

    def test_9_start_refuses_unsafe_credentials(self):
        c = self.c
        bad = c.root / "bad-auth"
        bad.mkdir(exist_ok=True)
        d = c.node_dir(99)
        env = c.env(POD_NAME="redis-99", POD_NAMESPACE=NAMESPACE, REDIS_AUTH_DIR=bad,
                    REDIS_BASE_CONF=PROD_CONF, REDIS_RUN_DIR=d / "run", REDIS_DATA_DIR=d / "data",
                    REDIS_SERVER="false")
        for password, acl, why in (
            (None, None, "no .*password"),
            ("short", None, "shorter than 16"),
            ("has space in it, quite long", None, "use only"),
            ("x" * 32, "user default on nopass ~* +@all\n", "defines the default user"),
            ("x" * 32, "user licensing on >p ~*\nacllog-max-len 1\n", "only hold 'user"),
        ):
            for name in ("password", "users.acl"):
                (bad / name).unlink(missing_ok=True)
            if password is not None:
                (bad / "password").write_text(password)
            if acl is not None:
                (bad / "users.acl").write_text(acl)
            with self.subTest(why=why):
                out = c.run("start.sh", env=env)
                self.assertEqual(out.returncode, 1)
                self.assertRegex(out.stderr, why)


if __name__ == "__main__":
    unittest.main()
