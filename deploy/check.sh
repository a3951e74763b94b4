#!/usr/bin/env bash
# Static checks of the Kubernetes deployment (run in CI from the repository root):
#   1. every overlay renders with `kubectl kustomize`;
#   2. the rendered manifests pass `kubernetes-validate --strict` for KUBE_VERSION;
#   3. deploy/tests: manifest properties (probes, security, PDBs, network flows, Redis persistence,
#      Dockerfile) and flags/env vars against the binaries' --help.
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

for overlay in "${overlays[@]}"; do
  out="$rendered/$overlay.yaml"
  echo "== kustomize: deploy/overlays/$overlay"
  kubectl kustomize "deploy/overlays/$overlay" >"$out"
  echo "== kubernetes-validate --strict -k $KUBE_VERSION: $overlay ($(grep -c '^kind:' "$out") objects)"
  kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$out"
done

echo "== deploy tests"
python3 -m unittest discover -s deploy/tests -p 'test_*.py' -t deploy/tests -v
