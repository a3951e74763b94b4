"""Helpers shared by the deploy tests: render overlays, walk pod specs, evaluate selectors and
NetworkPolicies. Standard library + PyYAML only."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS_DIR = DEPLOY / "overlays"

# The binaries the image carries (deploy/Dockerfile) and the Cargo package each comes from.
BINARIES = {
    "chipgate-licensing": "chipgate-licensing",
    "chipgate-inventory": "chipgate-inventory",
    "chipgate-orders": "chipgate-orders",
    "chipgate": "chipgate",
}
SERVICE_BINARIES = ("chipgate-licensing", "chipgate-inventory", "chipgate-orders")

# Defaults of the server runtime (crates/runtime), used when the manifests leave a setting unset.
DEFAULT_SHUTDOWN_GRACE = "20s"
DEFAULT_DRAIN_DELAY = "0s"
# Kubernetes' default terminationGracePeriodSeconds.
DEFAULT_TERMINATION_GRACE = 30

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


@functools.lru_cache(maxsize=None)
def _render_text(overlay: str) -> str:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS_DIR / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize deploy/overlays/{overlay} failed:\n{proc.stderr}")
    return proc.stdout


@functools.lru_cache(maxsize=None)
def _render_docs(overlay: str) -> tuple:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(d for d in yaml.load_all(_render_text(overlay), Loader=loader) if d)


def render(overlay: str) -> list[dict]:
    """The overlay's rendered objects (a fresh copy each call, so tests may mutate them)."""
    return copy.deepcopy(list(_render_docs(overlay)))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    for d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return d
    return None


def namespace_of(doc: dict) -> str:
    return doc.get("metadata", {}).get("namespace", "default")


def pod_template(workload: dict) -> dict:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]
    return spec["template"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") in WORKLOAD_KINDS]


def containers(pod_spec: dict, include_init: bool = True) -> list[dict]:
    out = list(pod_spec.get("containers", []))
    if include_init:
        out += pod_spec.get("initContainers", [])
    return out


def configmaps(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(namespace_of(d), d["metadata"]["name"]): d.get("data", {}) or {} for d in by_kind(docs, "ConfigMap")}


def secrets(docs: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for d in by_kind(docs, "Secret"):
        keys = dict(d.get("data", {}) or {})
        keys.update(d.get("stringData", {}) or {})
        out[(namespace_of(d), d["metadata"]["name"])] = keys
    return out


class Unresolvable(Exception):
    """An env source the tests cannot see (e.g. a Secret that is not part of the manifests)."""


def container_env(container: dict, namespace: str, docs: list[dict]) -> dict[str, str | None]:
    """Every env var the container gets: envFrom first, then env (which wins). Values from
    valueFrom references that the manifests do not contain are None."""
    cms = configmaps(docs)
    secs = secrets(docs)
    env: dict[str, str | None] = {}
    for src in container.get("envFrom", []) or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            data = cms.get((namespace, ref["name"]))
            if data is None:
                if ref.get("optional"):
                    continue
                raise Unresolvable(f"envFrom ConfigMap {ref['name']!r} is not in the manifests")
            for k, v in data.items():
                env[prefix + k] = v
        elif "secretRef" in src:
            ref = src["secretRef"]
            data = secs.get((namespace, ref["name"]))
            if data is None:
                raise Unresolvable(
                    f"envFrom Secret {ref['name']!r} is not in the manifests, so its variable names "
                    "cannot be checked: use env[].valueFrom.secretKeyRef with an explicit name instead"
                )
            for k in data:
                env[prefix + k] = None
    for e in container.get("env", []) or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            value = None
            if "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                value = cms.get((namespace, ref["name"]), {}).get(ref["key"])
            env[e["name"]] = value
        else:
            env[e["name"]] = ""
    return env


_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")


def parse_duration(text: str) -> float:
    """Seconds in a duration as the chipgate binaries parse it (250ms, 10s, 5m, 1h; bare = seconds)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration like 250ms, 10s, 5m or 1h")
    n = int(m.group(1))
    return {"ms": n / 1000, "s": n, None: n, "m": n * 60, "h": n * 3600}[m.group(2)]


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def parse_quantity(q) -> float:
    m = _QUANTITY.match(str(q))
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"unsupported quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def binary_of(container: dict) -> str | None:
    """The chipgate binary a container runs (basename of command[0]), or None for other images."""
    command = container.get("command") or []
    if command and os.path.basename(command[0]) in BINARIES:
        return os.path.basename(command[0])
    return None


def is_chipgate_image(container: dict) -> bool:
    image = container.get("image", "")
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return name == "chipgate"


def chipgate_args(container: dict) -> list[str]:
    return list((container.get("command") or [])[1:]) + list(container.get("args") or [])


# ---------------------------------------------------------------------------------------------
# Label selectors


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A metav1.LabelSelector; an empty selector matches everything."""
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# NetworkPolicy evaluation


class Endpoint:
    """A traffic endpoint: a workload's pods, or a stand-in for something outside the namespace."""

    def __init__(self, name: str, namespace: str, ns_labels: dict, labels: dict,
                 ports: list[dict] | None = None, is_pod_here: bool = False):
        self.name = name
        self.namespace = namespace
        self.ns_labels = ns_labels
        self.labels = labels
        self.ports = ports or []  # container ports, to resolve named ports
        self.is_pod_here = is_pod_here  # subject to this namespace's policies


def _peer_matches(peer: dict, policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        # IP-based: may match pods as well as outside addresses. Count it as matching anything, so
        # an ipBlock rule can only make the computed flow set larger (and the test fail).
        return True
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.ns_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return selector_matches(peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list[dict] | None, port: int, protocol: str, dest: Endpoint) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        want = p["port"]
        if isinstance(want, str):
            named = [cp for cp in dest.ports if cp.get("name") == want and cp.get("protocol", "TCP") == protocol]
            if any(cp["containerPort"] == port for cp in named):
                return True
            continue
        end = p.get("endPort", want)
        if want <= port <= end:
            return True
    return False


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


def _direction_allowed(policies: list[dict], subject: Endpoint, other: Endpoint,
                       port: int, protocol: str, direction: str) -> bool:
    """Whether `subject`'s policies allow traffic with `other` in `direction` (Ingress: other ->
    subject on subject's port; Egress: subject -> other on other's port)."""
    if not subject.is_pod_here:
        return True  # not governed by these policies
    applying = [
        p for p in policies
        if namespace_of(p) == subject.namespace
        and selector_matches(p["spec"].get("podSelector") or {}, subject.labels)
        and direction in _policy_types(p)
    ]
    if not applying:
        return True  # not isolated in this direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    dest = subject if direction == "Ingress" else other
    for p in applying:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, namespace_of(p), other) for peer in peers):
                continue
            if _port_matches(rule.get("ports"), port, protocol, dest):
                return True
    return False


def allowed_flows(policies: list[dict], sources: list[Endpoint], destinations: list[Endpoint],
                  ports: set[tuple[int, str]]) -> set[tuple[str, str, int, str]]:
    flows = set()
    for src in sources:
        for dst in destinations:
            if not src.is_pod_here and not dst.is_pod_here:
                continue  # outside to outside: not ours to judge
            for port, proto in ports:
                if _direction_allowed(policies, src, dst, port, proto, "Egress") and \
                        _direction_allowed(policies, dst, src, port, proto, "Ingress"):
                    flows.add((src.name, dst.name, port, proto))
    return flows


def endpoints(docs: list[dict]) -> dict[str, Endpoint]:
    """One endpoint per workload in the manifests, plus "external" (any client outside the
    namespace, or outside the cluster) and "kube-dns" (the cluster DNS pods in kube-system)."""
    ns_labels = {}
    for ns in by_kind(docs, "Namespace"):
        name = ns["metadata"]["name"]
        ns_labels[name] = {**(ns["metadata"].get("labels") or {}), "kubernetes.io/metadata.name": name}
    out = {}
    for w in workloads(docs):
        ns = namespace_of(w)
        tmpl = pod_template(w)
        ports = [p for c in containers(tmpl["spec"]) for p in c.get("ports", [])]
        out[w["metadata"]["name"]] = Endpoint(
            w["metadata"]["name"], ns, ns_labels.get(ns, {"kubernetes.io/metadata.name": ns}),
            tmpl["metadata"].get("labels") or {}, ports, is_pod_here=True,
        )
    out["external"] = Endpoint("external", "somewhere-else", {"kubernetes.io/metadata.name": "somewhere-else"}, {})
    # Prometheus, in the namespace the network policies let scrape the metrics ports.
    out["prometheus"] = Endpoint("prometheus", "monitoring", {"kubernetes.io/metadata.name": "monitoring"},
                                 {"app.kubernetes.io/name": "prometheus"})
    out["kube-dns"] = Endpoint(
        "kube-dns", "kube-system", {"kubernetes.io/metadata.name": "kube-system"},
        {"k8s-app": "kube-dns"}, [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
    )
    return out


def candidate_ports(docs: list[dict]) -> set[tuple[int, str]]:
    """Every port a policy or container mentions, DNS, and a few unrelated ones (so a rule
    without ports, or with too wide a range, shows up as extra flows)."""
    ports = {(53, "UDP"), (53, "TCP"), (80, "TCP"), (443, "TCP"), (8080, "TCP"), (9090, "TCP"),
             (12345, "UDP"), (65535, "TCP")}
    for p in by_kind(docs, "NetworkPolicy"):
        for key in ("ingress", "egress"):
            for rule in p["spec"].get(key) or []:
                for rp in rule.get("ports") or []:
                    if isinstance(rp.get("port"), int):
                        ports.add((rp["port"], rp.get("protocol", "TCP")))
                        if "endPort" in rp:
                            ports.add((rp["endPort"], rp.get("protocol", "TCP")))
                            ports.add((rp["endPort"] + 1, rp.get("protocol", "TCP")))
    for w in workloads(docs):
        for c in containers(pod_template(w)["spec"]):
            for cp in c.get("ports", []):
                ports.add((cp["containerPort"], cp.get("protocol", "TCP")))
    return ports
