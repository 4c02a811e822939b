#!/usr/bin/env bash
# Builds the Kubernetes server binaries e2e/run.sh needs, once per version, into a cache outside
# the repo. k8s.io/kubernetes is on the Go module proxy but not go-installable: its go.mod points
# k8s.io/* at ./staging, which the module zip lacks, so each replace is rewritten to the published
# module of the same minor (see shared/LAB.md).
set -Eeuo pipefail
trap 'echo "build-k8s: FAILED at line $LINENO: $BASH_COMMAND (exit status $?)" >&2' ERR

version=${1:?usage: build-k8s.sh VERSION OUTDIR}
out=${2:?usage: build-k8s.sh VERSION OUTDIR}
bins=(kubelet kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy)

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then exit 0; fi

minor=${version#v1.}; minor=${minor%%.*}
staging_ver="v0.${version#v1.}"
src=$(mktemp -d /tmp/k8s-src.XXXXXX)
trap 'chmod -R u+w "$src" 2>/dev/null; rm -rf "$src"' EXIT

info=$(go mod download -json "k8s.io/kubernetes@$version") || {
  echo "build-k8s: cannot download k8s.io/kubernetes@$version: $(sed -n 's/^\t"Error": //p' <<< "$info")" >&2
  exit 1
}
dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<< "$info")
cp -r "$dir/." "$src"; chmod -R u+w "$src"
rm -f "$src/go.work" "$src/go.work.sum"
sed -i -E "s#^(\s*)(k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+#\1\2 => \2 $staging_ver#" "$src/go.mod"

pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
mkdir -p "$out"
cd "$src"
for b in "${bins[@]}"; do
  [ -x "$out/$b" ] && continue
  echo "build-k8s: building $b $version" >&2
  GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "./cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
done
