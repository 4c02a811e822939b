#!/usr/bin/env bash
# e2e/run.sh: stand up a real single-node Kubernetes on this machine (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, containerd,
# runc, the CNI bridge), deploy the shipped k8s.yaml with images built from the
# project's Dockerfile, and show that calls survive pod termination.
#
# Needs root and Linux (cgroup v1 or v2), ~4 GB of disk. Installs what is
# missing (Debian packages, Go modules); builds the Kubernetes binaries once
# into $WSDRAIN_E2E_CACHE (default /var/cache/wsdrain-e2e), keyed by version.
# On any exit it stops every process it started, by PID, and removes every
# mount, bridge and directory it created, and nothing else.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.33.13}
CACHE=${WSDRAIN_E2E_CACHE:-/var/cache/wsdrain-e2e}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GO_BUILDER_TAG=$(sed -n 's/^FROM .*golang:\([0-9.]*\) AS build$/\1/p' "$REPO/Dockerfile")
API_PORT=16443
ETCD_PORT=12379
BRIDGE=wsdrain0
POD_CIDR=10.244.77.0/24
NODE_IP=10.244.77.1
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

started=$(date +%s.%N)
phase_start=$started
phase() {
  local now; now=$(date +%s.%N)
  awk -v p="$1" -v a="$phase_start" -v b="$now" -v s="$started" \
    'BEGIN { printf "\n### %s  (previous phase %.1fs, total %.1fs)\n", p, b - a, b - s }'
  phase_start=$now
}
die() { echo "e2e: $*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || die "needs Linux"
[ "$(id -u)" = 0 ] || die "needs root: it starts a kubelet, containerd and network bridges"
mkdir -p "$CACHE"
exec 9> "$CACHE/run.lock"
flock -n 9 || die "another e2e run is active on this host (two kubelets cannot share one)"

# ---------------------------------------------------------------- cleanup
W=""
pids=()
created=()      # system paths this run created, removed at exit
trap cleanup EXIT
trap 'exit 130' INT TERM

remember_new() { for p in "$@"; do [ -e "$p" ] || created+=("$p"); done; }

# Shared runtime directories: at exit, only the entries this run added go.
watched=(/run/netns /run/containerd/s /run/containerd/runc/k8s.io /var/lib/cni/results
  /var/lib/cni/networks /var/lib/kubelet/device-plugins /var/log/containers /var/log/pods)
snapshot_watched() { for d in "${watched[@]}"; do ls -A "$d" > "$W/before${d//\//_}" 2>/dev/null || true; done; }
remove_added_entries() {
  local d e
  for d in "${watched[@]}"; do
    [ -d "$d" ] || continue
    for e in $(ls -A "$d"); do
      grep -qxF "$e" "$W/before${d//\//_}" 2>/dev/null && continue
      mountpoint -q "$d/$e" && umount -l "$d/$e"
      rm -rf "${d:?}/$e"
    done
  done
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  echo
  echo "### cleanup"
  if [ -n "$W" ] && [ -S "$W/containerd.sock" ]; then
    # Pods first, through the kubelet so that CNI releases their addresses;
    # then whatever is left, by force. Their shims outlive containerd.
    "$KUBECTL" --kubeconfig "$W/kubeconfig" delete deployment,pod --all --grace-period=1 --wait=true --timeout=40s >/dev/null 2>&1
    local ctr=(ctr --address "$W/containerd.sock" -n k8s.io) t
    for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks delete -f "$t" >/dev/null 2>&1; done
    for t in $("${ctr[@]}" containers ls -q 2>/dev/null); do "${ctr[@]}" containers delete "$t" >/dev/null 2>&1; done
  fi
  # Stop in reverse order of start; the API server before etcd.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null
    for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${pids[i]}" 2>/dev/null
  done
  if [ -n "$W" ]; then
    # containerd shims started for this run's socket.
    for p in /proc/[0-9]*; do
      if tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q -- "-address $W/containerd.sock"; then
        kill -9 "${p#/proc/}" 2>/dev/null
      fi
    done
    sleep 0.5
    # Mounts under the work dir and this run's network namespaces, deepest first.
    awk -v w="$W" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
    remove_added_entries
  fi
  ip link show "$BRIDGE" >/dev/null 2>&1 && [ -n "$W" ] && [ -e "$W/bridge.ours" ] && ip link delete "$BRIDGE"
  for p in "${created[@]}"; do rm -rf "$p"; done
  if [ -n "$W" ] && [ -f "$W/iptables.before" ] && ! diff -q "$W/iptables.before" <(iptables_rules) >/dev/null; then
    echo "WARNING: the firewall rules changed during the run:"; diff "$W/iptables.before" <(iptables_rules)
  fi
  [ -n "$W" ] && rm -rf "$W"
  echo "removed the work dir, mounts, bridge $BRIDGE and ${#created[@]} system paths this run created"
  exit "$rc"
}

# ------------------------------------------------------------- preflight
phase "installing what is missing"
need_pkgs=()
for pair in containerd:containerd runc:runc buildah:buildah ctr:containerd openssl:openssl ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need_pkgs+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
command -v go >/dev/null || die "needs Go (>= 1.24) on PATH"
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "apt-get install ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
mkdir -p "$CACHE/debs"
for pkg in etcd-server busybox-static; do
  if ! ls "$CACHE/debs/$pkg"_*.deb >/dev/null 2>&1; then
    (cd "$CACHE/debs" && apt-get download "$pkg" 2>/dev/null) || { apt-get update -qq; (cd "$CACHE/debs" && apt-get download "$pkg"); }
  fi
  [ -d "$CACHE/$pkg" ] || dpkg-deb -x "$CACHE/debs/$pkg"_*.deb "$CACHE/$pkg"
done
ETCD=$CACHE/etcd-server/usr/bin/etcd
BUSYBOX=$CACHE/busybox-static/bin/busybox
[ -x "$ETCD" ] && [ -x "$BUSYBOX" ] || die "etcd or busybox missing from their Debian packages"

phase "Kubernetes $K8S_VERSION binaries (built once into $CACHE)"
BIN=$CACHE/k8s-$K8S_VERSION
bash "$REPO/e2e/build-k8s.sh" "$K8S_VERSION" "$BIN"
KUBECTL=$BIN/kubectl

W=$(mktemp -d /var/tmp/wsdrain-e2e.XXXXXX)
snapshot_watched
iptables_rules() { { iptables-save; ip6tables-save; } 2>/dev/null | grep -v '^[#:]' | sed 's/\[[0-9:]*\]//'; }
iptables_rules > "$W/iptables.before"
remember_new /run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods /run/netns /opt/cni
mkdir -p "$W"/{etcd,pki,containerd,cni/net.d,cni/ipam,kubelet,logs,images,buildah}

# ------------------------------------------------------------------ images
phase "images: pause, demo app, wsdrain from the project's Dockerfile"
export CONTAINERS_CONF=$W/containers.conf
cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
EOF
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$W/policy.json"
bah() { buildah --root "$W/buildah/root" --runroot "$W/buildah/run" --storage-driver vfs "$@"; }

(cd "$REPO/e2e" && CGO_ENABLED=0 go build -trimpath -o "$W/images/" ./cmd/pause ./cmd/wsapp ./cmd/scenarios)

json_array() { # the arguments as a JSON array of strings
  local out="" a
  for a in "$@"; do a=${a//\\/\\\\}; out+="${out:+,}\"${a//\"/\\\"}\""; done
  echo "[$out]"
}
scratch_image() { # name, then files as SRC:DEST, then -- and the entrypoint
  local name=$1 c; shift
  c=$(bah from scratch)
  while [ "$1" != -- ]; do bah copy "$c" "${1%%:*}" "${1#*:}" >/dev/null; shift; done
  shift
  bah config --entrypoint "$(json_array "$@")" "$c"
  bah commit -q "$c" "$name" >/dev/null
  bah rm "$c" >/dev/null
}
scratch_image localhost/wsdrain-e2e/pause:1 "$W/images/pause:/pause" -- /pause
scratch_image localhost/wsdrain-e2e/wsapp:1 "$W/images/wsapp:/wsapp" -- /wsapp --listen :8080
scratch_image localhost/wsdrain-e2e/wsapp-wrapped:1 "$W/images/wsapp:/wsapp" "$BUSYBOX:/bin/sh" -- \
  /bin/sh -c '/wsapp --listen :8080; echo "wrapper: app exited"'

# No registry: a stand-in for the Dockerfile's golang builder, made from the
# local Go toolchain, so the Dockerfile itself is built unmodified.
c=$(bah from scratch)
bah copy "$c" "$(go env GOROOT)" /usr/local/go >/dev/null
bah copy "$c" "$BUSYBOX" /bin/sh >/dev/null
bah config --env PATH=/usr/local/go/bin:/bin --env GOPATH=/go --env GOCACHE=/tmp/go-cache \
  --env GOTOOLCHAIN=local --env HOME=/tmp "$c"
bah commit -q "$c" "docker.io/library/golang:$GO_BUILDER_TAG" >/dev/null
bah rm "$c" >/dev/null
echo "stand-in builder image golang:$GO_BUILDER_TAG from $(go version)"
bah bud -q --pull=never --isolation chroot --signature-policy "$W/policy.json" \
  --build-arg VERSION=e2e -t localhost/wsdrain-e2e/wsdrain:e2e -f "$REPO/Dockerfile" "$REPO" >/dev/null
echo "built localhost/wsdrain-e2e/wsdrain:e2e from Dockerfile"

# ------------------------------------------------------------- containerd
phase "containerd, CNI bridge $BRIDGE on $POD_CIDR"
cat > "$W/containerd.toml" <<EOF
version = 2
root = "$W/containerd/root"
state = "$W/containerd/state"
[grpc]
  address = "$W/containerd.sock"
[ttrpc]
  address = "$W/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/wsdrain-e2e/pause:1"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$W/cni/net.d"
EOF
cat > "$W/cni/net.d/10-wsdrain.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "wsdrain-e2e", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "dataDir": "$W/cni/ipam"}}]}
EOF
# The bridge is made here, not by CNI, so that the kubelet can serve on its
# address: reachable from this host and its pods only.
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge && touch "$W/bridge.ours"
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
fi
containerd --config "$W/containerd.toml" > "$W/logs/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$W/containerd.sock" ] && break; sleep 0.1; done
CTR=(ctr --address "$W/containerd.sock" -n k8s.io)
for img in pause:1 wsapp:1 wsapp-wrapped:1 wsdrain:e2e; do
  bah push -q --signature-policy "$W/policy.json" "localhost/wsdrain-e2e/$img" \
    "docker-archive:$W/images/img.tar:localhost/wsdrain-e2e/$img" >/dev/null
  "${CTR[@]}" images import "$W/images/img.tar" >/dev/null
  rm -f "$W/images/img.tar"
done
"${CTR[@]}" images ls -q | grep wsdrain-e2e

# ------------------------------------------------------ control plane
phase "etcd, kube-apiserver, kube-controller-manager, kube-scheduler"
TOKEN=$(openssl rand -hex 16)
echo "$TOKEN,admin,admin,system:masters" > "$W/pki/tokens.csv"
openssl genrsa -out "$W/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$W/pki/sa.key" -pubout -out "$W/pki/sa.pub" 2>/dev/null
cat > "$W/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$TOKEN"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin, namespace: default}}]
current-context: e2e
EOF
"$ETCD" --data-dir "$W/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls http://127.0.0.1:12380 \
  > "$W/logs/etcd.log" 2>&1 &
pids+=($!)
"$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --cert-dir "$W/pki/apiserver" \
  --token-auth-file "$W/pki/tokens.csv" --authorization-mode AlwaysAllow \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$W/pki/sa.pub" \
  --service-account-signing-key-file "$W/pki/sa.key" --service-cluster-ip-range 10.96.0.0/24 \
  --disable-admission-plugins ServiceAccount --enable-priority-and-fairness=false \
  --kubelet-preferred-address-types InternalIP \
  > "$W/logs/kube-apiserver.log" 2>&1 &
pids+=($!)
for i in $(seq 120); do
  "$KUBECTL" --kubeconfig "$W/kubeconfig" get --raw /readyz >/dev/null 2>&1 && break
  [ "$i" = 120 ] && { tail -20 "$W/logs/kube-apiserver.log"; die "API server not ready"; }
  sleep 0.5
done
"$BIN/kube-controller-manager" --kubeconfig "$W/kubeconfig" --leader-elect=false \
  --service-account-private-key-file "$W/pki/sa.key" --use-service-account-credentials=false \
  --controllers '*,-serviceaccount-token' --bind-address 127.0.0.1 --secure-port 0 \
  > "$W/logs/kube-controller-manager.log" 2>&1 &
pids+=($!)
"$BIN/kube-scheduler" --kubeconfig "$W/kubeconfig" --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
  > "$W/logs/kube-scheduler.log" 2>&1 &
pids+=($!)

phase "kubelet"
cat > "$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$W/containerd.sock
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
podLogsDir: $W/kubelet/pod-logs
volumePluginDir: $W/kubelet/volume-plugins
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
serializeImagePulls: false
# The host's firewall is not this test's to change.
makeIPTablesUtilChains: false
EOF
# -v=3: the kubelet then logs each preStop hook it runs and completes.
"$BIN/kubelet" --config "$W/kubelet.yaml" --kubeconfig "$W/kubeconfig" --root-dir "$W/kubelet/root" \
  --cert-dir "$W/kubelet/pki" --hostname-override wsdrain-e2e --node-ip "$NODE_IP" --v=3 \
  > "$W/logs/kubelet.log" 2>&1 &
pids+=($!)
for i in $(seq 240); do
  "$KUBECTL" --kubeconfig "$W/kubeconfig" get node wsdrain-e2e -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True && break
  [ "$i" = 240 ] && { grep -E '^E' "$W/logs/kubelet.log" | tail -20; die "node not Ready after 2 minutes"; }
  sleep 0.5
done
"$KUBECTL" --kubeconfig "$W/kubeconfig" get node -o wide

# ------------------------------------------------------------ scenarios
phase "scenarios"
set +e
"$W/images/scenarios" -kubectl "$KUBECTL" -kubeconfig "$W/kubeconfig" -api "https://127.0.0.1:$API_PORT" \
  -token "$TOKEN" -manifest "$REPO/k8s.yaml" -work "$W" -kubelet-log "$W/logs/kubelet.log" \
  -wsdrain-image localhost/wsdrain-e2e/wsdrain:e2e -app-image localhost/wsdrain-e2e/wsapp:1 \
  -wrapped-app-image localhost/wsdrain-e2e/wsapp-wrapped:1
result=$?
set -e
if [ "$result" != 0 ]; then
  mkdir -p "$CACHE/last-failure" && cp "$W"/logs/*.log "$CACHE/last-failure/"
  echo "component logs kept in $CACHE/last-failure/"
fi
phase "done"
exit "$result"
