#!/usr/bin/env bash
# Builds the container runtime e2e/run.sh gives every Kubernetes version, once per version, into a
# cache outside the repo: containerd 2 with its runc shim, and runc with seccomp (cgo, libseccomp).
#   build-runtime.sh containerd VERSION OUTDIR    containerd, containerd-shim-runc-v2, ctr
#   build-runtime.sh runc VERSION OUTDIR          runc
# Both come from the Go module proxy, built inside a copy of the module as build-k8s.sh does.
set -Eeuo pipefail
trap 'echo "build-runtime: FAILED at line $LINENO: $BASH_COMMAND (exit status $?)" >&2' ERR

what=${1:?usage: build-runtime.sh containerd|runc VERSION OUTDIR}
version=${2:?usage: build-runtime.sh containerd|runc VERSION OUTDIR}
out=${3:?usage: build-runtime.sh containerd|runc VERSION OUTDIR}
case $what in
  containerd) module=github.com/containerd/containerd/v2; bins=(containerd containerd-shim-runc-v2 ctr) ;;
  runc) module=github.com/opencontainers/runc; bins=(runc) ;;
  *) echo "build-runtime: unknown component $what" >&2; exit 2 ;;
esac

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then exit 0; fi

src=$(mktemp -d /tmp/runtime-src.XXXXXX)
trap 'chmod -R u+w "$src" 2>/dev/null; rm -rf "$src"' EXIT
info=$(go mod download -json "$module@$version") || {
  echo "build-runtime: cannot download $module@$version: $(sed -n 's/^\t"Error": //p' <<< "$info")" >&2
  exit 1
}
dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<< "$info")
cp -r "$dir/." "$src"; chmod -R u+w "$src"
rm -f "$src/go.work" "$src/go.work.sum"
mkdir -p "$out"
cd "$src"
for b in "${bins[@]}"; do
  [ -x "$out/$b" ] && continue
  echo "build-runtime: building $b $version" >&2
  if [ "$what" = containerd ]; then
    # No cgo: the snapshotters that need it are left out; overlayfs is all the e2e uses.
    GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs" \
      -ldflags "-s -w -X $module/version.Version=$version -X $module/version.Revision=module-proxy" \
      -o "$out/$b.tmp" "./cmd/$b"
  else
    # seccomp needs cgo and libseccomp: without it RuntimeDefault would not be applied.
    GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=1 go build -trimpath -tags seccomp \
      -ldflags "-s -w -X main.version=${version#v} -X main.gitCommit=module-proxy" -o "$out/$b.tmp" .
  fi
  mv "$out/$b.tmp" "$out/$b"
done
