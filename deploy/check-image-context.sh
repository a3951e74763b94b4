#!/usr/bin/env bash
# CI check: the image's build context is enough to compile the workspace.
#
# Mirrors exactly the files deploy/Dockerfile.dockerignore admits (deploy/image_context.py, the
# BuildKit rules) into target/image-context/ and runs `cargo check --locked --offline` there, so an
# `include_str!`/`include_bytes!` (or a path dependency) that reaches outside the context fails here,
# not in `docker build`. No container engine needed. The context lives at a fixed place and shares
# the main target directory, so only the workspace crates are checked again (dependencies are reused
# from the clippy step before it).
set -euo pipefail
cd "$(dirname "$0")/.."

context="target/image-context"
python3 deploy/image_context.py copy "$context"
CARGO_TARGET_DIR="$PWD/target" cargo check --locked --offline --workspace --manifest-path "$context/Cargo.toml"
echo "the build context compiles"
