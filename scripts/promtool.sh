#!/usr/bin/env bash
# Extracts promtool (check metrics, check rules, test rules) from Debian's prometheus package
# into a cache directory, starting no service, and prints its path. Instant when cached.
set -euo pipefail
version=$(apt-cache policy prometheus | awk '/Candidate:/ { print $2 }')
[ -n "$version" ] && [ "$version" != "(none)" ] || { echo "promtool: Debian has no prometheus package here" >&2; exit 1; }
dir="${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/promtool-${version//[:+~]/_}"
if [ ! -x "$dir/promtool" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "prometheus=$version" >&2)
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$dir"
  cp "$tmp/root/usr/bin/promtool" "$dir/promtool.tmp" && mv "$dir/promtool.tmp" "$dir/promtool"
fi
echo "$dir/promtool"
