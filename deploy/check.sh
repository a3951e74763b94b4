#!/usr/bin/env bash
# Static checks of the Kubernetes deployment (run in CI from the repository root):
#   1. every overlay renders with `kubectl kustomize`, and so does every component applied to prod;
#   2. the rendered manifests pass `kubernetes-validate --strict` for KUBE_VERSION;
#   3. the shell scripts pass shellcheck (when it is installed; the Redis Cluster scripts as POSIX sh,
#      which is what the redis image runs them with);
#   4. deploy/tests: manifest properties (probes, security, PDBs, network flows, Redis persistence and
#      cluster, Dockerfile), flags/env vars against the binaries' --help, and the Redis Cluster scripts
#      run against six local redis-server processes (Redis >= 7.0 on PATH; loopback only, ~20 s).
# The flags test needs the debug binaries (cargo build --workspace --bins), or CHIPGATE_BIN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

# Native gRPC probes are GA since 1.27, the preStop `sleep` action is on by default since 1.30.
KUBE_VERSION="${KUBE_VERSION:-1.32.0}"

if ! command -v kubectl >/dev/null 2>&1; then
  echo "deploy/check.sh: kubectl is required (for 'kubectl kustomize')" >&2
  exit 1
fi
# Python tools live in the virtual environment scripts/test.sh makes under target/ (PEP 668 Pythons
# refuse pip installs into the system interpreter).
if ! command -v kubernetes-validate >/dev/null 2>&1 || ! python3 -c "import kubernetes_validate, yaml" 2>/dev/null; then
  venv="${CHIPGATE_VENV:-$PWD/target/venv}"
  [ -x "$venv/bin/python3" ] || python3 -m venv "$venv"
  export PATH="$venv/bin:$PATH"
  if ! python3 -c "import kubernetes_validate, yaml" 2>/dev/null; then
    echo "== installing kubernetes-validate and PyYAML into $venv"
    python3 -m pip install -q kubernetes-validate pyyaml
  fi
fi

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

overlays=()
for dir in deploy/overlays/*/; do
  overlays+=("$(basename "$dir")")
done
if [ "${#overlays[@]}" -eq 0 ]; then
  echo "deploy/check.sh: no overlays under deploy/overlays" >&2
  exit 1
fi

validate() { # NAME FILE
  echo "== kubernetes-validate --strict -k $KUBE_VERSION: $1 ($(grep -c '^kind:' "$2") objects)"
  kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$2"
}

for overlay in "${overlays[@]}"; do
  out="$rendered/$overlay.yaml"
  echo "== kustomize: deploy/overlays/$overlay"
  kubectl kustomize "deploy/overlays/$overlay" >"$out"
  validate "$overlay" "$out"
done

# Components are applied the way an operator applies them: from an overlay that has prod as a
# resource. Kinds whose schema kubernetes-validate lacks (the ServiceMonitor CRD) are warnings only.
for dir in deploy/components/*/; do
  component="$(basename "$dir")"
  wrapper="$rendered/with-$component"
  mkdir -p "$wrapper"
  # kustomize wants relative paths to directories.
  rel() { python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$1" "$wrapper"; }
  printf '%s\n' \
    "apiVersion: kustomize.config.k8s.io/v1beta1" \
    "kind: Kustomization" \
    "resources: [\"$(rel "$PWD/deploy/overlays/prod")\"]" \
    "components: [\"$(rel "$PWD/deploy/components/$component")\"]" >"$wrapper/kustomization.yaml"
  out="$rendered/prod+$component.yaml"
  echo "== kustomize: deploy/overlays/prod + deploy/components/$component"
  kubectl kustomize "$wrapper" >"$out"
  validate "prod+$component" "$out"
done

if command -v shellcheck >/dev/null 2>&1; then
  echo "== shellcheck"
  shellcheck deploy/*.sh
  shellcheck -s sh deploy/overlays/prod/redis-cluster/*.sh
else
  echo "== shellcheck: not installed, skipped (apt-get install shellcheck)"
fi

echo "== deploy tests"
python3 -m unittest discover -s deploy/tests -p 'test_*.py' -t deploy/tests -v
