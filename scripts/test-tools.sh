#!/usr/bin/env bash
# Builds the test tooling (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kubectl, helm, kwok, and the pod sandbox's pause program) from Go modules into a cache directory
# keyed by its inputs, and prints that bin directory.
# A warm call only checks the key and returns. Usage: eval "$(scripts/test-tools.sh --env)"
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
mod="$here/test/tools/k8s"
pause="$here/test/tools/pause"

K8S_VERSION=v1.34.4
HELM_VERSION=v3.19.5
KWOK_VERSION=v0.7.0

go_version=$(go env GOVERSION)
key=$( { cat "$mod/go.mod" "$mod/go.sum" "$pause/go.mod" "$pause/main.go"; echo "$HELM_VERSION $KWOK_VERSION $go_version"; sed -n '/^build()/,$p' "$0"; } | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/test-tools/$key"

build() {
  local out=$1 date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local cb=k8s.io/component-base/version cg=k8s.io/client-go/pkg/version
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local kflags="-s -w"
  for p in $cb $cg; do
    kflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    kflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  (
    cd "$mod"
    echo "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl $K8S_VERSION" >&2
    go build -trimpath -ldflags "$kflags" -o "$out/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kubectl
    echo "building etcd" >&2
    go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
  )
  echo "building pause" >&2
  (cd "$pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/pause" .)
  echo "building helm $HELM_VERSION, kwok $KWOK_VERSION" >&2
  # The Kubernetes version helm assumes without a cluster (helm template, lint), as its Makefile
  # sets it: the client-go it is built with, 1.34.
  local helm_k8s=""
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    helm_k8s+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=34"
  done
  GOBIN="$out" GOFLAGS=-mod=mod go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.metadata= $helm_k8s" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  GOBIN="$out" GOFLAGS=-mod=mod go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

if [ ! -x "$cache/bin/kwok" ]; then
  start=$(date +%s)
  tmp="$cache.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp/bin"
  trap 'rm -rf "$tmp"' EXIT
  build "$tmp/bin"
  rm -rf "$cache"; mv "$tmp" "$cache"
  trap - EXIT
  echo "test tools built in $(( $(date +%s) - start ))s into $cache" >&2
fi

if [ "${1:-}" = "--env" ]; then
  echo "export LOCKSTEP_TEST_BIN='$cache/bin'"
else
  echo "$cache/bin"
fi
