#!/usr/bin/env bash
# Builds both packages from this checkout: the release binary, its man
# page, the .deb (cargo deb) and the .rpm (cargo generate-rpm). Installs the
# two cargo tools if they are missing. Prints the two package paths.
# Usage: packaging/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked -q
command -v cargo-generate-rpm >/dev/null || cargo install cargo-generate-rpm --locked -q
cargo build --release --quiet
mkdir -p target/man
target/release/tokenvault-webhook man | gzip -9n > target/man/tokenvault-webhook.1.gz
cargo deb --no-build --quiet
cargo generate-rpm --quiet 2>/dev/null || cargo generate-rpm
ls -t target/debian/tokenvault-webhook_*.deb | head -1
ls -t target/generate-rpm/*.rpm | head -1
