"""Properties of the rendered Kubernetes manifests (every overlay), so they cannot silently regress.

Run: python3 -m unittest discover -s deploy/tests -t deploy/tests   (or: bash deploy/check.sh)
Needs kubectl (for `kubectl kustomize`) and PyYAML.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import k8s  # noqa: E402
import yaml  # noqa: E402

SERVICES = {"licensing": 50051, "inventory": 50052, "orders": 50053}
REDIS_PORT = 6379
REDIS_BUS_PORT = 16379
# How each overlay runs Redis: "single" (the base's one pod), "cluster" (the prod Redis Cluster:
# StatefulSet of 6 + bootstrap Job) or "external" (the external-redis-cluster component: none here).
# A new overlay must say which, so that the tests below know what to expect of it.
REDIS_SHAPES = {"dev": "single", "prod": "cluster", "prod-external-redis": "external"}
METRICS_PORT = 9464
DURATION_VARS = ("CHIPGATE_REQUEST_TIMEOUT", "CHIPGATE_SHUTDOWN_GRACE", "CHIPGATE_DRAIN_DELAY",
                 "CHIPGATE_REDIS_TIMEOUT")


def redis_shape(overlay: str) -> str:
    if overlay not in REDIS_SHAPES:
        raise AssertionError(f"overlay {overlay!r}: add it to REDIS_SHAPES in {__file__}")
    return REDIS_SHAPES[overlay]


def is_job(workload: dict) -> bool:
    """Jobs run to completion: no probes, no preStop, no PDB."""
    return workload["kind"] in ("Job", "CronJob")


def expected_flows(shape: str = "single") -> set[tuple[str, str, int, str]]:
    flows = set()
    for name, port in SERVICES.items():
        flows.add(("external", name, port, "TCP"))            # public gRPC ports
        if shape == "external":
            # services -> the managed Redis Cluster. The policy allows address ranges (ipBlock), which
            # the flow model counts as matching any peer: anything outside this namespace on 6379.
            for outside in ("external", "prometheus", "kube-dns"):
                flows.add((name, outside, REDIS_PORT, "TCP"))
        else:
            flows.add((name, "redis", REDIS_PORT, "TCP"))      # services -> Redis
        flows.add((name, "kube-dns", 53, "UDP"))               # name resolution
        flows.add((name, "kube-dns", 53, "TCP"))
        flows.add(("prometheus", name, METRICS_PORT, "TCP"))  # scraping /metrics
        flows.add(("prometheus", name, port, "TCP"))          # the public ports are public to it too
    flows.add(("orders", "licensing", SERVICES["licensing"], "TCP"))
    flows.add(("orders", "inventory", SERVICES["inventory"], "TCP"))
    if shape == "cluster":
        flows.add(("redis", "redis", REDIS_PORT, "TCP"))       # replication, the preStop handover
        flows.add(("redis", "redis", REDIS_BUS_PORT, "TCP"))   # the cluster bus
        flows.add(("redis", "kube-dns", 53, "UDP"))            # start.sh resolves its peers
        flows.add(("redis", "kube-dns", 53, "TCP"))
        flows.add(("redis-cluster-bootstrap", "redis", REDIS_PORT, "TCP"))
        flows.add(("redis-cluster-bootstrap", "kube-dns", 53, "UDP"))
        flows.add(("redis-cluster-bootstrap", "kube-dns", 53, "TCP"))
    return flows


class OverlayCase(unittest.TestCase):
    """Runs each check against every overlay; each test opens one subtest per overlay or container,
    so one failure does not hide the others."""

    def each_overlay(self):
        names = k8s.overlays()
        self.assertTrue({"dev", "prod"} <= set(names), f"overlays dev and prod must exist, found {names}")
        for name in names:
            yield name, k8s.render(name)

    def each_container(self):
        for overlay, docs in self.each_overlay():
            for w in k8s.workloads(docs):
                pod = k8s.pod_template(w)["spec"]
                for c in k8s.containers(pod):
                    yield overlay, docs, w, pod, c


class Workloads(OverlayCase):
    def test_expected_workloads_exist(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for name in SERVICES:
                    self.assertIsNotNone(k8s.find(docs, "Deployment", name), f"Deployment {name}")
                shape = redis_shape(overlay)
                redis = k8s.find(docs, "StatefulSet", "redis")
                if shape == "external":
                    self.assertIsNone(redis, "no in-cluster Redis with an external one")
                    self.assertEqual([w["metadata"]["name"] for w in k8s.workloads(docs)
                                      if w["kind"] not in ("Deployment",)], [], "nothing but the services")
                else:
                    self.assertIsNotNone(redis, "StatefulSet redis")
                bootstrap = k8s.find(docs, "Job", "redis-cluster-bootstrap")
                self.assertEqual(bootstrap is not None, shape == "cluster", "a bootstrap Job exactly with a cluster")

    def test_everything_in_one_namespace(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                namespaces = [d["metadata"]["name"] for d in k8s.by_kind(docs, "Namespace")]
                self.assertEqual(len(namespaces), 1, namespaces)
                for d in docs:
                    if d["kind"] != "Namespace":
                        self.assertEqual(k8s.namespace_of(d), namespaces[0], f"{d['kind']}/{d['metadata']['name']}")

    def test_chipgate_containers_run_a_known_binary(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if k8s.is_chipgate_image(c):
                    self.assertIsNotNone(
                        k8s.binary_of(c),
                        f"chipgate container must set command to one of /usr/local/bin/{{{', '.join(k8s.BINARIES)}}}",
                    )
                    self.assertTrue(c["command"][0].startswith("/usr/local/bin/"), c["command"])

    def test_every_service_listens_on_its_port(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for name, port in SERVICES.items():
                    d = k8s.find(docs, "Deployment", name)
                    c = k8s.pod_template(d)["spec"]["containers"][0]
                    self.assertEqual(k8s.binary_of(c), f"chipgate-{name}")
                    env = k8s.container_env(c, k8s.namespace_of(d), docs)
                    self.assertEqual(env.get("CHIPGATE_LISTEN"), f"0.0.0.0:{port}")
                    self.assertIn(port, [p["containerPort"] for p in c.get("ports", [])])
                    self.assertEqual(env.get("CHIPGATE_LOG_FORMAT"), "json", "json logs in Kubernetes")


class Metrics(OverlayCase):
    def test_every_service_serves_metrics_where_prometheus_looks(self):
        for overlay, docs in self.each_overlay():
            for name in SERVICES:
                with self.subTest(overlay=overlay, service=name):
                    d = k8s.find(docs, "Deployment", name)
                    tmpl = k8s.pod_template(d)
                    c = tmpl["spec"]["containers"][0]
                    env = k8s.container_env(c, k8s.namespace_of(d), docs)
                    listen = env.get("CHIPGATE_METRICS_LISTEN", "")
                    self.assertTrue(listen, "CHIPGATE_METRICS_LISTEN is set")
                    port = int(listen.rsplit(":", 1)[1])
                    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                    self.assertEqual(named.get("metrics"), port, "a container port named metrics")
                    notes = tmpl["metadata"].get("annotations") or {}
                    self.assertEqual(notes.get("prometheus.io/scrape"), "true")
                    self.assertEqual(notes.get("prometheus.io/port"), str(port))
                    self.assertEqual(notes.get("prometheus.io/path"), "/metrics")
                    svc = k8s.find(docs, "Service", name)
                    svc_ports = {p.get("name"): p.get("targetPort") for p in svc["spec"]["ports"]}
                    self.assertEqual(svc_ports.get("metrics"), port, "the Service names the metrics port")

    def test_dashboard_ships_as_a_grafana_configmap(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                maps = [m for m in k8s.by_kind(docs, "ConfigMap")
                        if (m["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
                self.assertEqual(len(maps), 1, "one dashboard ConfigMap for Grafana's sidecar")
                import json
                dash = json.loads(maps[0]["data"]["chipgate.json"])
                self.assertGreaterEqual(len(dash["panels"]), 10)


class Probes(OverlayCase):
    def test_every_container_has_startup_readiness_liveness(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if c in pod.get("initContainers", []) or is_job(w):
                    continue
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    self.assertIn(probe, c, f"{probe} missing")
                    handlers = [h for h in ("grpc", "httpGet", "tcpSocket", "exec") if h in c[probe]]
                    self.assertEqual(len(handlers), 1, f"{probe}: exactly one handler, got {handlers}")
                    h = handlers[0]
                    if h != "exec":
                        self.assertIsInstance(c[probe][h]["port"], int, f"{probe}: numeric port")

    def test_chipgate_probes_are_grpc_on_the_serving_port(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if not k8s.is_chipgate_image(c):
                    continue
                env = k8s.container_env(c, k8s.namespace_of(w), docs)
                listen_port = int(env["CHIPGATE_LISTEN"].rsplit(":", 1)[1])
                # With a plaintext health port (needed once the gRPC port requires mTLS), probes use it.
                if env.get("CHIPGATE_HEALTH_LISTEN"):
                    listen_port = int(env["CHIPGATE_HEALTH_LISTEN"].rsplit(":", 1)[1])
                container_ports = [p["containerPort"] for p in c.get("ports", [])]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    self.assertIn("grpc", c[probe], f"{probe} must be a native gRPC probe")
                    port = c[probe]["grpc"]["port"]
                    self.assertIsInstance(port, int, f"{probe}: numeric port")
                    self.assertEqual(port, listen_port, f"{probe} probes the port the server listens on")
                    self.assertIn(port, container_ports)
                    # Readiness and startup ask the overall status (follows Redis and draining);
                    # liveness asks "liveness" (follows only the process), so a Redis outage does not
                    # restart every pod.
                    want = "liveness" if probe == "livenessProbe" else ""
                    self.assertEqual(c[probe]["grpc"].get("service", ""), want, f"{probe} health name")

    def test_liveness_is_more_patient_than_readiness(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if c in pod.get("initContainers", []) or is_job(w):
                    continue
                def budget(p):
                    return p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
                self.assertGreater(budget(c["livenessProbe"]), budget(c["readinessProbe"]))
                self.assertGreaterEqual(budget(c["livenessProbe"]), 30, "liveness tolerates 30s of NOT_SERVING")


class Resources(OverlayCase):
    def test_requests_and_limits(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                res = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        self.assertIn(r, res.get(kind) or {}, f"resources.{kind}.{r}")
                for r in ("cpu", "memory"):
                    self.assertLessEqual(k8s.parse_quantity(res["requests"][r]), k8s.parse_quantity(res["limits"][r]),
                                         f"{r}: request <= limit")


class Security(OverlayCase):
    def test_security_context_complete(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                psc = pod.get("securityContext") or {}
                csc = c.get("securityContext") or {}

                def effective(key):
                    return csc.get(key, psc.get(key))

                self.assertIs(effective("runAsNonRoot"), True, "runAsNonRoot")
                if effective("runAsUser") is not None:
                    self.assertNotEqual(effective("runAsUser"), 0, "runAsUser 0")
                self.assertIs(csc.get("allowPrivilegeEscalation"), False, "allowPrivilegeEscalation: false")
                self.assertIs(csc.get("readOnlyRootFilesystem"), True, "readOnlyRootFilesystem: true")
                self.assertNotEqual(csc.get("privileged"), True, "privileged")
                caps = csc.get("capabilities") or {}
                self.assertIn("ALL", caps.get("drop") or [], "capabilities.drop ALL")
                self.assertFalse(caps.get("add"), "no added capabilities")
                seccomp = effective("seccompProfile") or {}
                self.assertEqual(seccomp.get("type"), "RuntimeDefault", "seccompProfile RuntimeDefault")

    def test_no_host_namespaces_or_host_paths(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for w in k8s.workloads(docs):
                    pod = k8s.pod_template(w)["spec"]
                    for key in ("hostNetwork", "hostPID", "hostIPC"):
                        self.assertNotEqual(pod.get(key), True, f"{w['metadata']['name']}: {key}")
                    for v in pod.get("volumes", []):
                        self.assertNotIn("hostPath", v, f"{w['metadata']['name']}: hostPath volume")

    def test_service_accounts_without_token(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                accounts = {(k8s.namespace_of(sa), sa["metadata"]["name"]): sa for sa in k8s.by_kind(docs, "ServiceAccount")}
                for w in k8s.workloads(docs):
                    pod = k8s.pod_template(w)["spec"]
                    name = pod.get("serviceAccountName")
                    self.assertTrue(name, f"{w['metadata']['name']}: own serviceAccountName")
                    sa = accounts.get((k8s.namespace_of(w), name))
                    self.assertIsNotNone(sa, f"ServiceAccount {name} rendered")
                    self.assertIs(sa.get("automountServiceAccountToken"), False, f"{name}: automount off")
                    self.assertIs(pod.get("automountServiceAccountToken"), False, f"{w['metadata']['name']}: automount off")

    def test_secret_volumes_are_optional(self):
        """Secrets are optional: a missing key or certificate shows as the binary's own error."""
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for w in k8s.workloads(docs):
                    for v in k8s.pod_template(w)["spec"].get("volumes", []):
                        if "secret" in v:
                            self.assertIs(v["secret"].get("optional"), True, f"{w['metadata']['name']}: {v['name']}")

    def test_referenced_configmaps_exist(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                cms = k8s.configmaps(docs)
                for w in k8s.workloads(docs):
                    ns = k8s.namespace_of(w)
                    pod = k8s.pod_template(w)["spec"]
                    for v in pod.get("volumes", []):
                        if "configMap" in v:
                            self.assertIn((ns, v["configMap"]["name"]), cms, v)
                    for c in k8s.containers(pod):
                        k8s.container_env(c, ns, docs)  # raises on a missing ConfigMap

    def test_namespace_enforces_restricted_pod_security(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                ns = k8s.by_kind(docs, "Namespace")[0]
                self.assertEqual(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce"), "restricted")


class GracefulShutdown(OverlayCase):
    def test_durations_parse(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if not k8s.is_chipgate_image(c):
                    continue
                env = k8s.container_env(c, k8s.namespace_of(w), docs)
                for var in DURATION_VARS:
                    if env.get(var) is not None:
                        k8s.parse_duration(env[var])

    def test_prestop_and_termination_grace_exceed_the_drain(self):
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if c in pod.get("initContainers", []) or is_job(w):
                    continue
                pre_stop = (c.get("lifecycle") or {}).get("preStop")
                self.assertTrue(pre_stop, "preStop hook")
                pre_stop_seconds = (pre_stop.get("sleep") or {}).get("seconds", 0)
                drain = 0.0
                if k8s.is_chipgate_image(c):
                    env = k8s.container_env(c, k8s.namespace_of(w), docs)
                    grace = k8s.parse_duration(env.get("CHIPGATE_SHUTDOWN_GRACE") or k8s.DEFAULT_SHUTDOWN_GRACE)
                    delay = k8s.parse_duration(env.get("CHIPGATE_DRAIN_DELAY") or k8s.DEFAULT_DRAIN_DELAY)
                    drain = grace + delay
                tgps = pod.get("terminationGracePeriodSeconds", k8s.DEFAULT_TERMINATION_GRACE)
                self.assertGreater(
                    tgps, pre_stop_seconds + drain,
                    f"terminationGracePeriodSeconds {tgps} must exceed preStop {pre_stop_seconds}s + "
                    f"drain delay + shutdown grace ({drain}s)",
                )


class Services(OverlayCase):
    def test_each_service_has_a_headless_grpc_service(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for name, port in SERVICES.items():
                    svc = k8s.find(docs, "Service", name)
                    self.assertIsNotNone(svc, f"Service {name}")
                    self.assertEqual(svc["spec"].get("clusterIP"), "None", "headless (see deploy/README.md)")
                    d = k8s.find(docs, "Deployment", name)
                    self.assertTrue(k8s.selector_matches({"matchLabels": svc["spec"]["selector"]},
                                                         k8s.pod_template(d)["metadata"]["labels"]))
                    ports = [(p["port"], p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]]
                    self.assertIn((port, port), ports)

    def test_configured_urls_point_at_rendered_services(self):
        pattern = re.compile(r"^(?:rediss?|https?)://(?:[^@/]*@)?([a-z0-9-]+)(?:\.([a-z0-9.-]+))?:(\d+)(?:/.*)?$")
        for overlay, docs, w, pod, c in self.each_container():
            with self.subTest(overlay=overlay, workload=w["metadata"]["name"], container=c["name"]):
                if not k8s.is_chipgate_image(c):
                    continue
                env = k8s.container_env(c, k8s.namespace_of(w), docs)
                for var in ("REDIS_URL", "CHIPGATE_LICENSING_URL", "CHIPGATE_INVENTORY_URL"):
                    if env.get(var) is None:
                        continue
                    # With CHIPGATE_REDIS_CLUSTER=true, REDIS_URL is a comma-separated list of seeds.
                    urls = [env[var]]
                    if var == "REDIS_URL" and env.get("CHIPGATE_REDIS_CLUSTER") == "true":
                        urls = env[var].split(",")
                    for url in urls:
                        m = pattern.match(url)
                        self.assertIsNotNone(m, f"{var}={env[var]!r}")
                        host, domain, port = m.group(1), m.group(2), int(m.group(3))
                        svc = k8s.find(docs, "Service", host)
                        if svc is None and domain:
                            # <pod>.<headless Service>: a StatefulSet pod's own name.
                            governing = domain.split(".")[0]
                            svc = k8s.find(docs, "Service", governing)
                            self.assertIsNotNone(svc, f"{var}: Service {governing} rendered ({url})")
                            self.assertEqual(svc["spec"].get("clusterIP"), "None", f"{governing} is headless")
                            sts = [s for s in k8s.by_kind(docs, "StatefulSet") if s["spec"]["serviceName"] == governing]
                            self.assertEqual(len(sts), 1, f"a StatefulSet governed by {governing}")
                            ordinal = host.removeprefix(sts[0]["metadata"]["name"] + "-")
                            self.assertTrue(ordinal.isdigit(), f"{host} is a pod of {sts[0]['metadata']['name']}")
                            self.assertLess(int(ordinal), sts[0]["spec"]["replicas"], f"{host} exists")
                        self.assertIsNotNone(svc, f"{var}: Service {host} rendered")
                        self.assertIn(port, [p["port"] for p in svc["spec"]["ports"]], f"{var}: port {port}")
                if k8s.binary_of(c) == "chipgate-orders":
                    self.assertIn("CHIPGATE_LICENSING_URL", env)
                    self.assertIn("CHIPGATE_INVENTORY_URL", env)


class DisruptionBudgets(OverlayCase):
    @staticmethod
    def effective_replicas(docs, w):
        for hpa in k8s.by_kind(docs, "HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            if ref["kind"] == w["kind"] and ref["name"] == w["metadata"]["name"]:
                return hpa["spec"].get("minReplicas", 1)
        return w["spec"].get("replicas", 1)

    def test_multi_replica_workloads_have_exactly_one_pdb(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                pdbs = k8s.by_kind(docs, "PodDisruptionBudget")
                for w in k8s.workloads(docs):
                    replicas = self.effective_replicas(docs, w)
                    labels = k8s.pod_template(w)["metadata"]["labels"]
                    covering = [p for p in pdbs if k8s.namespace_of(p) == k8s.namespace_of(w)
                                and p["spec"].get("selector") and k8s.selector_matches(p["spec"]["selector"], labels)]
                    name = f"{w['kind']}/{w['metadata']['name']} ({replicas} replicas)"
                    if replicas > 1:
                        self.assertEqual(len(covering), 1, f"{name}: one PDB, got {[p['metadata']['name'] for p in covering]}")
                        spec = covering[0]["spec"]
                        if "maxUnavailable" in spec:
                            self.assertGreaterEqual(spec["maxUnavailable"], 1, f"{name}: PDB allows evictions")
                        if isinstance(spec.get("minAvailable"), int):
                            self.assertLess(spec["minAvailable"], replicas, f"{name}: PDB allows evictions")
                    else:
                        self.assertEqual(covering, [], f"{name}: a PDB on a single replica would block drains")

    def test_every_pdb_selects_a_workload(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for p in k8s.by_kind(docs, "PodDisruptionBudget"):
                    hits = [w for w in k8s.workloads(docs)
                            if k8s.selector_matches(p["spec"]["selector"], k8s.pod_template(w)["metadata"]["labels"])]
                    self.assertTrue(hits, f"PDB {p['metadata']['name']} selects nothing")


class NetworkPolicies(OverlayCase):
    def test_default_deny_both_directions(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                deny = [p for p in k8s.by_kind(docs, "NetworkPolicy")
                        if p["spec"].get("podSelector") in ({}, None)
                        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
                        and not p["spec"].get("ingress") and not p["spec"].get("egress")]
                self.assertTrue(deny, "a default-deny policy for ingress and egress of every pod")

    def test_allowed_flows_are_exactly_the_listed_ones(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                eps = k8s.endpoints(docs)
                policies = k8s.by_kind(docs, "NetworkPolicy")
                sources = [e for n, e in eps.items() if n != "kube-dns"]
                flows = k8s.allowed_flows(policies, sources, list(eps.values()), k8s.candidate_ports(docs))
                want = expected_flows(redis_shape(overlay))
                self.assertEqual(
                    flows, want,
                    f"\nunexpected: {sorted(flows - want)}\nmissing: {sorted(want - flows)}",
                )

    def test_policy_ports_are_numeric(self):
        for overlay, docs in self.each_overlay():
            with self.subTest(overlay=overlay):
                for p in k8s.by_kind(docs, "NetworkPolicy"):
                    for key in ("ingress", "egress"):
                        for rule in p["spec"].get(key) or []:
                            for rp in rule.get("ports") or []:
                                self.assertIsInstance(rp.get("port"), int, f"{p['metadata']['name']}: {rp}")


class FlowModelSelfTest(unittest.TestCase):
    """The flow computation itself, on small hand-made policies."""

    def setUp(self):
        self.docs = k8s.render("dev")
        self.eps = k8s.endpoints(self.docs)
        self.sources = [e for n, e in self.eps.items() if n != "kube-dns"]
        self.ports = k8s.candidate_ports(self.docs)

    def flows(self, policies):
        return k8s.allowed_flows(policies, self.sources, list(self.eps.values()), self.ports)

    def test_no_policies_allows_everything(self):
        flows = self.flows([])
        self.assertIn(("redis", "external", 443, "TCP"), flows)
        self.assertIn(("external", "redis", 6379, "TCP"), flows)

    def test_dropping_default_deny_opens_redis_egress(self):
        policies = [p for p in k8s.by_kind(self.docs, "NetworkPolicy") if p["metadata"]["name"] != "default-deny-all"]
        self.assertIn(("redis", "external", 443, "TCP"), self.flows(policies))

    def test_rule_without_ports_opens_every_port(self):
        policies = k8s.by_kind(self.docs, "NetworkPolicy")
        for p in policies:
            if p["metadata"]["name"] == "orders-egress":
                del p["spec"]["egress"][0]["ports"]
        flows = self.flows(policies)
        # licensing only admits its gRPC port, so a port-less egress rule alone adds nothing ...
        self.assertNotIn(("orders", "licensing", 65535, "TCP"), flows)
        # ... but port-less rules on both sides of orders -> redis do.
        for p in policies:
            if p["metadata"]["name"] == "redis-ingress":
                del p["spec"]["ingress"][0]["ports"]
            if p["metadata"]["name"] == "services-to-redis-egress":
                del p["spec"]["egress"][0]["ports"]
        self.assertIn(("orders", "redis", 8080, "TCP"), self.flows(policies))


class Persistence(unittest.TestCase):
    @staticmethod
    def redis_conf(docs) -> tuple[dict, dict, dict]:
        sts = k8s.find(docs, "StatefulSet", "redis")
        pod = k8s.pod_template(sts)["spec"]
        c = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        if c["command"][0] == "redis-server":
            conf_path = c["command"][-1]
        else:
            # The cluster's start.sh includes the shared config named by REDIS_BASE_CONF.
            conf_path = k8s.container_env(c, k8s.namespace_of(sts), docs)["REDIS_BASE_CONF"]
        cms = k8s.configmaps(docs)
        for v in pod["volumes"]:
            if "configMap" in v and conf_path.startswith(mounts[v["name"]] + "/"):
                data = cms[(k8s.namespace_of(sts), v["configMap"]["name"])]
                text = data[conf_path[len(mounts[v["name"]]) + 1:]]
                conf = {}
                for line in text.splitlines():
                    line = line.strip()
                    if line and not line.startswith("#"):
                        key, _, value = line.partition(" ")
                        conf[key.lower()] = value.strip().strip('"')
                return sts, conf, mounts
        raise AssertionError(f"redis config {conf_path} is not from a ConfigMap")

    def test_prod_redis_has_aof_on_a_pvc(self):
        docs = k8s.render("prod")
        sts, conf, mounts = self.redis_conf(docs)
        self.assertEqual(conf.get("appendonly"), "yes")
        self.assertIn(conf.get("appendfsync"), ("everysec", "always"))
        templates = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
        data_volume = [n for n, p in mounts.items() if p == conf.get("dir")]
        self.assertEqual(len(data_volume), 1, f"redis dir {conf.get('dir')} is a mount")
        self.assertIn(data_volume[0], templates, "redis dir is on a PersistentVolumeClaim")
        pod_volumes = [v["name"] for v in k8s.pod_template(sts)["spec"].get("volumes", [])]
        self.assertNotIn(data_volume[0], pod_volumes, "no pod volume shadows the claim")
        self.assertEqual(conf.get("maxmemory-policy"), "noeviction")

    def test_dev_redis_has_no_persistence(self):
        docs = k8s.render("dev")
        sts, conf, _mounts = self.redis_conf(docs)
        self.assertEqual(conf.get("appendonly"), "no")
        self.assertFalse(sts["spec"].get("volumeClaimTemplates"), "dev Redis has no PVC")
        claims = [c["metadata"]["name"] for c in k8s.by_kind(docs, "PersistentVolumeClaim")]
        self.assertEqual(claims, ["chipgate-archive"], "the archive is the only claim in dev")
        self.assertEqual(conf.get("maxmemory-policy"), "noeviction")

    def test_archive_is_mounted_where_licensing_and_orders_archive(self):
        for overlay in ("dev", "prod"):
            docs = k8s.render(overlay)
            claims = {c["metadata"]["name"]: c for c in k8s.by_kind(docs, "PersistentVolumeClaim")}
            self.assertIn("chipgate-archive", claims, overlay)
            if overlay == "prod":
                self.assertEqual(claims["chipgate-archive"]["spec"]["accessModes"], ["ReadWriteMany"])
            for dep in k8s.by_kind(docs, "Deployment"):
                name = dep["metadata"]["name"]
                if name not in ("licensing", "orders"):
                    continue
                pod = k8s.pod_template(dep)["spec"]
                container = pod["containers"][0]
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                url = env.get("CHIPGATE_ARCHIVE_URL")
                self.assertTrue(url, f"{overlay}/{name} archives")
                mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == url]
                self.assertEqual(len(mounts), 1, f"{overlay}/{name}: {url} is a mount")
                mount = mounts[0]
                volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                self.assertEqual(volume["persistentVolumeClaim"]["claimName"], "chipgate-archive")
                self.assertFalse(mount.get("readOnly"), f"{overlay}/{name} writes the archive")


def mount_of(container: dict, pod: dict, path: str) -> dict | None:
    """The volume whose mount holds `path` (a file), or None."""
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return next(v for v in pod.get("volumes", []) if v["name"] == m["name"])
    return None


def secret_items(volume: dict) -> set[str]:
    return {i["key"] for i in volume["secret"].get("items", [])}


class RedisCluster(unittest.TestCase):
    """prod: a Redis Cluster of 6 pods, formed by a Job, reached by the services through config only."""

    @classmethod
    def setUpClass(cls):
        cls.docs = k8s.render("prod")
        cls.sts = k8s.find(cls.docs, "StatefulSet", "redis")
        cls.pod = k8s.pod_template(cls.sts)["spec"]
        cls.redis = cls.pod["containers"][0]
        cls.job = k8s.find(cls.docs, "Job", "redis-cluster-bootstrap")
        cls.scripts = next(d["data"] for d in k8s.by_kind(cls.docs, "ConfigMap")
                           if d["metadata"]["name"].startswith("redis-cluster-scripts-"))
        _, cls.conf, _ = Persistence.redis_conf(cls.docs)

    def test_six_pods_started_together_behind_a_headless_service(self):
        self.assertEqual(self.sts["spec"]["replicas"], 6)
        self.assertEqual(self.sts["spec"]["podManagementPolicy"], "Parallel",
                         "no pod is ready before the cluster is formed: OrderedReady would wait for redis-0")
        headless = k8s.find(self.docs, "Service", self.sts["spec"]["serviceName"])
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertIs(headless["spec"].get("publishNotReadyAddresses"), True)
        self.assertEqual({p["port"] for p in headless["spec"]["ports"]}, {REDIS_PORT, REDIS_BUS_PORT})
        self.assertIsNone(k8s.find(self.docs, "Service", "redis"), "no single-address Service in front of a cluster")
        self.assertIn(REDIS_BUS_PORT, [p["containerPort"] for p in self.redis["ports"]])

    def test_cluster_config_announces_hostnames_and_persists(self):
        conf = self.conf
        self.assertEqual(conf.get("cluster-enabled"), "yes")
        self.assertEqual(conf.get("cluster-port"), str(REDIS_BUS_PORT))
        self.assertEqual(conf.get("cluster-preferred-endpoint-type"), "hostname")
        self.assertEqual(conf.get("appendonly"), "yes")
        self.assertEqual(conf.get("appendfsync"), "everysec")
        self.assertEqual(conf.get("dir"), "/data")
        self.assertEqual(conf.get("maxmemory-policy"), "noeviction")
        # The per-pod and secret part comes from start.sh, the container's command.
        self.assertEqual(self.redis["command"], ["sh", "/scripts/start.sh"])
        scripts = mount_of(self.redis, self.pod, "/scripts/start.sh")
        self.assertTrue(scripts["configMap"]["name"].startswith("redis-cluster-scripts-"))
        start = self.scripts["start.sh"]
        self.assertIn('announce="$POD_NAME.$headless.$POD_NAMESPACE.svc"', start)
        self.assertIn('echo "cluster-announce-hostname $announce"', start)
        env = k8s.container_env(self.redis, "chipgate", self.docs)
        self.assertEqual(env.get("REDIS_HEADLESS_SERVICE"), self.sts["spec"]["serviceName"])
        for var in ("POD_NAME", "POD_NAMESPACE", "POD_IP"):
            self.assertIn(var, env)

    def test_no_password_in_any_configmap_or_env(self):
        for cm in k8s.by_kind(self.docs, "ConfigMap"):
            for key, text in (cm.get("data") or {}).items():
                for line in text.splitlines():
                    self.assertNotRegex(line.strip(), r"^(requirepass|masterauth|user)\s",
                                        f"{cm['metadata']['name']}/{key}: secrets come from Secrets")
        for w in k8s.workloads(self.docs):
            for c in k8s.containers(k8s.pod_template(w)["spec"]):
                for e in c.get("env", []):
                    self.assertNotIn("secretKeyRef", e.get("valueFrom", {}), f"{w['metadata']['name']}: {e['name']}")
                for src in c.get("envFrom", []):
                    self.assertNotIn("secretRef", src)
                env = k8s.container_env(c, "chipgate", self.docs)
                self.assertNotIn("@", env.get("REDIS_URL") or "", "no credentials in REDIS_URL")

    def test_scripts_configmap_is_the_tested_scripts(self):
        # deploy/tests/test_redis_cluster.py runs the files; the pods get exactly them.
        folder = k8s.DEPLOY / "overlays" / "prod" / "redis-cluster"
        self.assertEqual(set(self.scripts), {p.name for p in folder.glob("*.sh")})
        for name, text in self.scripts.items():
            self.assertEqual(text, (folder / name).read_text(), name)

    def test_redis_reads_its_password_and_users_from_the_secret(self):
        auth = mount_of(self.redis, self.pod, "/etc/redis-auth/password")
        self.assertIsNotNone(auth, "the scripts' REDIS_AUTH_DIR (/etc/redis-auth) is mounted")
        self.assertEqual(auth["secret"]["secretName"], "chipgate-redis-auth")
        self.assertEqual(secret_items(auth), {"password", "users.acl"})
        for script in ("start.sh", "probe.sh", "prestop.sh", "bootstrap.sh"):
            self.assertIn("auth_dir=${REDIS_AUTH_DIR:-/etc/redis-auth}", self.scripts[script], script)
        run = mount_of(self.redis, self.pod, "/run/redis/redis.conf")
        self.assertEqual(run["emptyDir"].get("medium"), "Memory", "the generated config (with the password) stays in memory")

    def test_probes_authenticate_and_prestop_hands_over(self):
        self.assertEqual(self.redis["readinessProbe"]["exec"]["command"], ["sh", "/scripts/probe.sh", "ready"])
        self.assertEqual(self.redis["livenessProbe"]["exec"]["command"], ["sh", "/scripts/probe.sh", "alive"])
        self.assertIn("REDISCLI_AUTH=$(cat \"$auth_dir/password\"", self.scripts["probe.sh"])
        self.assertIn("tcpSocket", self.redis["startupProbe"])
        self.assertEqual(self.redis["lifecycle"]["preStop"], {"exec": {"command": ["sh", "/scripts/prestop.sh"]}})
        self.assertIn("REDIS_PRESTOP_TIMEOUT:-20", self.scripts["prestop.sh"])
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], 20 + int(self.conf["shutdown-timeout"]),
                           "the handover and Redis' own shutdown fit in the grace period")

    def test_spread_across_nodes_and_zones(self):
        spread = {t["topologyKey"]: t for t in self.pod["topologySpreadConstraints"]}
        self.assertEqual(spread["kubernetes.io/hostname"]["whenUnsatisfiable"], "DoNotSchedule")
        self.assertEqual(spread["kubernetes.io/hostname"]["maxSkew"], 1)
        self.assertIn("topology.kubernetes.io/zone", spread)
        anti = self.pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        self.assertEqual(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname")
        labels = k8s.pod_template(self.sts)["metadata"]["labels"]
        for term in [anti["podAffinityTerm"]] + list(spread.values()):
            self.assertTrue(k8s.selector_matches(term["labelSelector"], labels))

    def test_disruption_budget_takes_one_redis_pod_at_a_time(self):
        pdb = k8s.find(self.docs, "PodDisruptionBudget", "redis")
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertEqual(pdb["spec"]["unhealthyPodEvictionPolicy"], "IfHealthyBudget")

    def test_bootstrap_job_forms_exactly_the_statefulset(self):
        spec = self.job["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        env = k8s.container_env(c, "chipgate", self.docs)
        self.assertEqual(int(env["REDIS_CLUSTER_SIZE"]), self.sts["spec"]["replicas"])
        self.assertEqual(env["REDIS_STATEFULSET"], self.sts["metadata"]["name"])
        self.assertEqual(env["REDIS_HEADLESS_SERVICE"], self.sts["spec"]["serviceName"])
        replicas = int(env["REDIS_CLUSTER_REPLICAS"])
        self.assertEqual(replicas, 1)
        self.assertEqual(self.sts["spec"]["replicas"], 3 * (replicas + 1), "3 masters with a replica each")
        self.assertEqual(c["command"], ["sh", "/scripts/bootstrap.sh"])
        self.assertEqual(c["image"], self.redis["image"], "its redis-cli is the servers' version")
        self.assertEqual(pod["restartPolicy"], "Never")
        self.assertGreater(spec["backoffLimit"], 0)
        self.assertIn("ttlSecondsAfterFinished", spec, "finished Jobs go away, so the next apply runs it again")
        auth = mount_of(c, pod, "/etc/redis-auth/password")
        self.assertEqual((auth["secret"]["secretName"], secret_items(auth)), ("chipgate-redis-auth", {"password"}))

    def test_services_use_the_cluster_as_their_own_user_with_a_password_file(self):
        secret_holders = {}
        for name in SERVICES:
            d = k8s.find(self.docs, "Deployment", name)
            pod = k8s.pod_template(d)["spec"]
            c = pod["containers"][0]
            env = k8s.container_env(c, "chipgate", self.docs)
            with self.subTest(service=name):
                self.assertEqual(env.get("CHIPGATE_REDIS_CLUSTER"), "true")
                self.assertEqual(env.get("CHIPGATE_REDIS_MIN_REPLICAS"), "1")
                self.assertEqual(env.get("CHIPGATE_REDIS_USERNAME"), name)
                seeds = env["REDIS_URL"].split(",")
                self.assertEqual(len(seeds), self.sts["spec"]["replicas"], "every pod is a seed")
                vol = mount_of(c, pod, env["CHIPGATE_REDIS_PASSWORD_FILE"])
                self.assertIsNotNone(vol, "the password file is a mounted Secret")
                self.assertEqual(vol["secret"]["secretName"], f"chipgate-{name}-redis")
                self.assertEqual(secret_items(vol), {"password"})
                self.assertTrue(env["CHIPGATE_REDIS_PASSWORD_FILE"].endswith("/password"))
            for v in pod["volumes"]:
                if "secret" in v and v["secret"]["secretName"].endswith("-redis"):
                    secret_holders.setdefault(v["secret"]["secretName"], []).append(name)
        self.assertEqual(secret_holders, {f"chipgate-{n}-redis": [n] for n in SERVICES},
                         "each service mounts its own Redis password only")

    def test_secrets_script_makes_what_the_manifests_mount(self):
        script = k8s.DEPLOY / "redis-cluster-secrets.sh"
        text = subprocess.run(["bash", str(script)], capture_output=True, check=True, text=True, timeout=60).stdout
        made = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text) if d}
        mounted = {}
        for w in k8s.workloads(self.docs):
            for v in k8s.pod_template(w)["spec"].get("volumes", []):
                name = v.get("secret", {}).get("secretName", "")
                if "redis" in name:
                    mounted.setdefault(name, set()).update(secret_items(v))
        self.assertEqual({n: set(d["data"]) for n, d in made.items()}, mounted)
        acl = base64.b64decode(made["chipgate-redis-auth"]["data"]["users.acl"]).decode()
        users = {line.split()[1]: line for line in acl.splitlines() if line.startswith("user ")}
        self.assertEqual(set(users), set(SERVICES), "one ACL user per service, no default user")
        for name, space in (("licensing", "lic"), ("inventory", "inv"), ("orders", "ord")):
            rules = users[name].split()
            self.assertIn(f"~{{{space}*", rules, f"{name} reaches its own keys")
            self.assertIn("resetkeys", rules)
            hashed = [r for r in rules if r.startswith("#")]
            self.assertEqual(len(hashed), 1, f"{name}: its password only as a SHA-256")
            password = base64.b64decode(made[f"chipgate-{name}-redis"]["data"]["password"])
            import hashlib
            self.assertEqual(hashed[0][1:], hashlib.sha256(password).hexdigest())
            self.assertNotIn(password.decode(), acl)


class ExternalRedisCluster(unittest.TestCase):
    """prod-external-redis: the component removes the in-cluster Redis and points the services at yours."""

    @classmethod
    def setUpClass(cls):
        cls.docs = k8s.render("prod-external-redis")

    def test_no_in_cluster_redis_left(self):
        for d in self.docs:
            name = d["metadata"]["name"]
            self.assertNotRegex(name, r"^(redis|chipgate-redis)", f"{d['kind']}/{name} belongs to the in-cluster Redis")

    def test_services_are_configured_from_the_operators_configmap_and_secrets(self):
        for name in SERVICES:
            d = k8s.find(self.docs, "Deployment", name)
            pod = k8s.pod_template(d)["spec"]
            c = pod["containers"][0]
            env = {e["name"]: e for e in c["env"]}
            common = k8s.container_env(c, "chipgate", self.docs)
            with self.subTest(service=name):
                self.assertEqual(env["REDIS_URL"]["valueFrom"]["configMapKeyRef"],
                                 {"name": "chipgate-external-redis", "key": "seeds"})
                self.assertEqual(env["CHIPGATE_REDIS_USERNAME"], {"name": "CHIPGATE_REDIS_USERNAME", "valueFrom": {
                    "configMapKeyRef": {"name": "chipgate-external-redis", "key": f"{name}.username"}}})
                self.assertEqual(common["CHIPGATE_REDIS_CLUSTER"], "true")
                ca = mount_of(c, pod, common["CHIPGATE_REDIS_CA"])
                self.assertEqual((ca["secret"]["secretName"], secret_items(ca)), ("chipgate-external-redis-ca", {"ca.crt"}))
                self.assertTrue(common["CHIPGATE_REDIS_CA"].endswith("/ca.crt"))
                pw = mount_of(c, pod, common["CHIPGATE_REDIS_PASSWORD_FILE"])
                self.assertEqual(pw["secret"]["secretName"], f"chipgate-{name}-redis")

    def test_the_component_also_replaces_the_single_redis_of_dev(self):
        component = k8s.DEPLOY / "components" / "external-redis-cluster"
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {os.path.relpath(k8s.DEPLOY / 'overlays' / 'dev', tmp)}\n"
                f"components:\n  - {os.path.relpath(component, tmp)}\n"
            )
            text = subprocess.run(["kubectl", "kustomize", tmp], capture_output=True, check=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(text) if d]
        self.assertEqual([d["metadata"]["name"] for d in docs if d["metadata"]["name"].startswith("redis")], [])
        self.assertTrue(k8s.find(docs, "NetworkPolicy", "services-to-external-redis-egress"))


class S3Archive(unittest.TestCase):
    """prod + the s3-archive component: licensing and orders archive to a bucket named by the
    operator's ConfigMap, with credentials from a Secret (or web identity), and mount no volume."""

    @classmethod
    def setUpClass(cls):
        component = k8s.DEPLOY / "components" / "s3-archive"
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {os.path.relpath(k8s.DEPLOY / 'overlays' / 'prod', tmp)}\n"
                f"components:\n  - {os.path.relpath(component, tmp)}\n"
            )
            text = subprocess.run(["kubectl", "kustomize", tmp], capture_output=True, check=True, text=True).stdout
        cls.docs = [d for d in yaml.safe_load_all(text) if d]

    def test_the_archive_volume_and_claim_are_gone(self):
        self.assertEqual([c["metadata"]["name"] for c in k8s.by_kind(self.docs, "PersistentVolumeClaim")
                          if c["metadata"]["name"] == "chipgate-archive"], [])
        for name in ("licensing", "orders"):
            pod = k8s.pod_template(k8s.find(self.docs, "Deployment", name))["spec"]
            self.assertNotIn("archive", [v["name"] for v in pod["volumes"]], name)
            mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
            self.assertNotIn("/var/lib/chipgate/archive", mounts, name)

    def test_url_region_and_credentials_come_from_the_operators_configmap_and_secret(self):
        for name in ("licensing", "orders"):
            c = k8s.pod_template(k8s.find(self.docs, "Deployment", name))["spec"]["containers"][0]
            env = {e["name"]: e for e in c["env"]}
            with self.subTest(service=name):
                self.assertEqual(env["CHIPGATE_ARCHIVE_URL"], {"name": "CHIPGATE_ARCHIVE_URL", "valueFrom": {
                    "configMapKeyRef": {"name": "chipgate-archive-s3", "key": "url"}}}, "no directory URL left")
                self.assertEqual(env["AWS_REGION"]["valueFrom"]["configMapKeyRef"]["name"], "chipgate-archive-s3")
                for var, key in (("AWS_ACCESS_KEY_ID", "access-key-id"), ("AWS_SECRET_ACCESS_KEY", "secret-access-key")):
                    ref = env[var]["valueFrom"]["secretKeyRef"]
                    self.assertEqual((ref["name"], ref["key"]), ("chipgate-archive-s3", key))
                    self.assertNotIn("value", env[var], "never a literal credential")
                self.assertIn("CHIPGATE_AUDIT_RETENTION" if name == "licensing" else "CHIPGATE_ORDER_RETENTION", env)

    def test_only_licensing_and_orders_reach_object_storage(self):
        policy = k8s.find(self.docs, "NetworkPolicy", "archive-to-object-storage-egress")
        self.assertTrue(policy)
        selector = policy["spec"]["podSelector"]["matchExpressions"][0]
        self.assertEqual(sorted(selector["values"]), ["licensing", "orders"])
        self.assertEqual([p["port"] for r in policy["spec"]["egress"] for p in r["ports"]], [443])


class OverlayShape(unittest.TestCase):
    def test_dev_one_replica_each_no_hpa(self):
        docs = k8s.render("dev")
        for w in k8s.workloads(docs):
            self.assertEqual(w["spec"].get("replicas", 1), 1, w["metadata"]["name"])
        self.assertEqual(k8s.by_kind(docs, "HorizontalPodAutoscaler"), [])

    def test_prod_several_replicas_and_orders_hpa(self):
        docs = k8s.render("prod")
        hpas = k8s.by_kind(docs, "HorizontalPodAutoscaler")
        orders_hpa = [h for h in hpas if h["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "orders"}]
        self.assertEqual(len(orders_hpa), 1, "an HPA for orders")
        spec = orders_hpa[0]["spec"]
        self.assertGreaterEqual(spec["minReplicas"], 2)
        self.assertGreater(spec["maxReplicas"], spec["minReplicas"])
        self.assertNotIn("replicas", k8s.find(docs, "Deployment", "orders")["spec"], "the HPA owns orders' replicas")
        for name in ("licensing", "inventory"):
            self.assertGreaterEqual(k8s.find(docs, "Deployment", name)["spec"].get("replicas", 1), 2, name)


class Dockerfile(unittest.TestCase):
    def setUp(self):
        self.text = (k8s.DEPLOY / "Dockerfile").read_text()
        self.stages = re.findall(r"(?im)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", self.text)

    def test_builder_is_rust_195_and_runtime_is_distroless_nonroot(self):
        self.assertGreaterEqual(len(self.stages), 2, "multi-stage")
        self.assertRegex(self.text, r"(?m)^ARG RUST_VERSION=1\.95\b")
        self.assertRegex(self.stages[0][0], r"rust:\$\{RUST_VERSION\}")
        runtime = self.stages[-1][0]
        self.assertTrue(runtime.startswith("gcr.io/distroless/cc-debian12") and runtime.endswith(":nonroot"), runtime)
        self.assertRegex(self.text, r"(?m)^ARG DEBIAN_RELEASE=bookworm\b", "glibc of builder == runtime (debian12)")
        users = re.findall(r"(?m)^USER\s+(\S+)", self.text)
        self.assertTrue(users, "USER set")
        uid = users[-1].split(":")[0]
        self.assertTrue(uid.isdigit() and int(uid) != 0, f"numeric non-root USER, got {users[-1]}")

    def test_builds_and_installs_every_binary(self):
        packages = set(re.findall(r"-p\s+([a-z0-9-]+)", self.text))
        self.assertEqual(packages, set(k8s.BINARIES.values()))
        self.assertRegex(self.text, r"cargo build --release --locked")
        loop = re.search(r"for bin in ([a-z0-9 -]+);", self.text)
        self.assertIsNotNone(loop)
        self.assertEqual(set(loop.group(1).split()), set(k8s.BINARIES))
        self.assertRegex(self.text, r"COPY --from=builder /out/bin/ /usr/local/bin/")
        # Stripped binaries in the image; their symbols in a stage of their own, not in the runtime.
        self.assertRegex(self.text, r"objcopy --only-keep-debug")
        self.assertRegex(self.text, r"objcopy --strip-all --add-gnu-debuglink")
        self.assertRegex(self.text, r"(?m)^FROM scratch AS debug-symbols$")
        self.assertEqual(self.stages[-1][1], "runtime", "the runtime is the default (last) stage")

    def test_image_is_labelled_with_its_version(self):
        self.assertRegex(self.text, r"(?m)^ARG VERSION=\d+\.\d+\.\d+$")
        self.assertRegex(self.text, r'app\.kubernetes\.io/version="\$\{VERSION\}"')
        self.assertRegex(self.text, r'org\.opencontainers\.image\.version="\$\{VERSION\}"')
        cargo = (k8s.REPO / "Cargo.toml").read_text()
        version = re.search(r'(?m)^version = "([^"]+)"', cargo).group(1)
        self.assertIn(f"ARG VERSION={version}", self.text, "the default is the workspace version")

    def test_toolchain_file_matches_the_builder(self):
        toolchain = (k8s.REPO / "rust-toolchain.toml").read_text()
        channel = re.search(r'(?m)^channel = "([^"]+)"', toolchain).group(1)
        builder = re.search(r"(?m)^ARG RUST_VERSION=(\S+)$", self.text).group(1)
        self.assertTrue(channel == builder or channel.startswith(builder + "."), (channel, builder))
        # That each package builds its binary is proven by test_flags.py (it runs every binary).

    def test_manifest_commands_exist_in_the_image(self):
        for overlay in k8s.overlays():
            for w in k8s.workloads(k8s.render(overlay)):
                for c in k8s.containers(k8s.pod_template(w)["spec"]):
                    if k8s.is_chipgate_image(c):
                        self.assertEqual(c["command"][0], f"/usr/local/bin/{k8s.binary_of(c)}")

    def test_dockerignore_admits_every_workspace_member(self):
        lines = [line.strip() for line in (k8s.DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
        allowed = {line[1:].strip("/") for line in lines if line.startswith("!")}
        self.assertTrue({"Cargo.toml", "Cargo.lock", "proto"} <= allowed, allowed)
        cargo = (k8s.REPO / "Cargo.toml").read_text()
        members = re.search(r"(?ms)^members\s*=\s*\[(.*?)\]", cargo).group(1)
        for member in re.findall(r'"([^"]+)"', members):
            self.assertIn(member.split("/")[0], allowed, f"workspace member {member} excluded from the build context")


class DevKeysAndMonitoring(unittest.TestCase):
    """The dev overlay starts by itself (its own dev-only key pair); prod carries no key at all; the
    ServiceMonitor component scrapes what the Services expose."""

    def test_dev_ships_a_matching_dev_key_pair_and_only_orders_holds_the_private_half(self):
        docs = k8s.render("dev")
        public = k8s.find(docs, "Secret", "chipgate-signing-keys") or next(
            (s for s in k8s.by_kind(docs, "Secret") if s["metadata"]["name"].startswith("chipgate-signing-keys")), None
        )
        self.assertIsNotNone(public, "dev renders the verification key Secret the base mounts")
        self.assertEqual(set(public["data"]), {"public.pem"}, "never the private key in the public Secret")
        keys = k8s.DEPLOY / "overlays" / "dev" / "dev-keys"
        derived = subprocess.run(
            ["openssl", "pkey", "-in", str(keys / "signing.pem"), "-pubout"], capture_output=True, check=True, text=True
        ).stdout
        self.assertEqual(base64.b64decode(public["data"]["public.pem"]).decode(), derived, "the halves match")
        holders = []
        for w in k8s.workloads(docs):
            for v in k8s.pod_template(w)["spec"].get("volumes", []):
                if v.get("secret", {}).get("secretName", "").startswith("chipgate-dev-signing-key"):
                    holders.append(w["metadata"]["name"])
        self.assertEqual(holders, ["orders"])
        orders_env = next(data for (_, name), data in k8s.configmaps(docs).items() if name.startswith("chipgate-orders-"))
        self.assertIn("CHIPGATE_SERVICE_SIGNING_KEY", orders_env)
        self.assertNotIn("CHIPGATE_SERVICE_TOKEN_FILE", orders_env, "the two exclude each other")

    def test_dev_audit_key_is_its_own_pair_and_only_licensing_holds_it(self):
        docs = k8s.render("dev")
        keys = k8s.DEPLOY / "overlays" / "dev" / "dev-keys"
        secret = next(
            (s for s in k8s.by_kind(docs, "Secret") if s["metadata"]["name"].startswith("chipgate-audit-signing-key")),
            None,
        )
        self.assertIsNotNone(secret, "dev renders the audit key Secret the base mounts")
        self.assertEqual(set(secret["data"]), {"signing.pem"})
        derive = lambda pem: subprocess.run(  # noqa: E731
            ["openssl", "pkey", "-pubout"], input=pem, capture_output=True, check=True, text=True
        ).stdout
        audit_private = base64.b64decode(secret["data"]["signing.pem"]).decode()
        self.assertEqual(derive(audit_private), (keys / "audit-public.pem").read_text(), "the halves match")
        self.assertNotEqual(
            derive(audit_private), derive((keys / "signing.pem").read_text()), "the audit key is not the token key"
        )
        holders = []
        for w in k8s.workloads(docs):
            for v in k8s.pod_template(w)["spec"].get("volumes", []):
                if v.get("secret", {}).get("secretName", "").startswith("chipgate-audit-signing-key"):
                    holders.append(w["metadata"]["name"])
        self.assertEqual(holders, ["licensing"])
        for overlay in k8s.overlays():
            lic = next(w for w in k8s.workloads(k8s.render(overlay)) if w["metadata"]["name"] == "licensing")
            env = {e["name"]: e.get("value") for e in k8s.pod_template(lic)["spec"]["containers"][0].get("env", [])}
            self.assertEqual(env.get("CHIPGATE_AUDIT_SIGNING_KEY_FILE"), "/etc/chipgate/audit-key/signing.pem", overlay)

    def test_prod_carries_no_key(self):
        for overlay in k8s.overlays():
            if overlay == "dev":
                continue
            with self.subTest(overlay=overlay):
                docs = k8s.render(overlay)
                self.assertEqual(k8s.by_kind(docs, "Secret"), [], "prod Secrets are created by the operator")
                self.assertNotIn("PRIVATE KEY", k8s._render_text(overlay))

    def test_servicemonitor_component_scrapes_every_services_metrics_port(self):
        component = k8s.DEPLOY / "components" / "servicemonitor"
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: chipgate\n"
                f"resources:\n  - {os.path.relpath(k8s.DEPLOY / 'overlays' / 'prod', tmp)}\n"
                f"components:\n  - {os.path.relpath(component, tmp)}\n"
            )
            text = subprocess.run(["kubectl", "kustomize", tmp], capture_output=True, check=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(text) if d]
        monitors = k8s.by_kind(docs, "ServiceMonitor")
        self.assertEqual(len(monitors), 1)
        spec = monitors[0]["spec"]
        self.assertEqual(monitors[0]["metadata"]["namespace"], "chipgate")
        selected = [
            s for s in k8s.by_kind(docs, "Service") if k8s.selector_matches(spec["selector"], s["metadata"]["labels"])
        ]
        self.assertEqual(sorted(s["metadata"]["name"] for s in selected), ["inventory", "licensing", "orders"])
        for s in selected:
            port = next((p for p in s["spec"]["ports"] if p["name"] == spec["endpoints"][0]["port"]), None)
            self.assertIsNotNone(port, s["metadata"]["name"])
            self.assertEqual(port["port"], 9464)


if __name__ == "__main__":
    unittest.main()
