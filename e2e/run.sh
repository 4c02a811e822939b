#!/usr/bin/env bash
# e2e/run.sh: stand up a real single-node Kubernetes on this machine (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, containerd,
# runc, the CNI bridge), deploy the shipped manifest with images built from the
# project's Dockerfile, and show that calls survive pod termination.
#
#   ./e2e/run.sh                                          the newest supported minor
#   K8S_VERSION=v1.35.4 ./e2e/run.sh                      another one
#   K8S_VERSIONS="v1.35.4 v1.36.3 v1.37.2" ./e2e/run.sh   each in turn (CI), one summary table
#
# Needs root and Linux (cgroup v1 or v2), ~4 GB of disk. Installs what is
# missing (Debian packages, Go modules); builds the Kubernetes binaries, and
# containerd 2 and runc (the runtime every version runs on), once into
# $WSDRAIN_E2E_CACHE (default /var/cache/wsdrain-e2e), keyed by version.
# Every call goes through the Service's ClusterIP, which kube-proxy (nftables
# mode) routes; its table is removed at the end.
# The images are built once per run; each version gets a fresh containerd,
# etcd, control plane and kubelet. On any exit it stops every process it
# started, by PID, and removes every mount, bridge and directory it created,
# and nothing else.
set -Eeuo pipefail

# Tested: v1.35.4, v1.36.3, v1.37.2 (supported minors) and v1.33.13.
read -r -a VERSIONS <<< "${K8S_VERSIONS:-${K8S_VERSION:-v1.37.2}}"
# The manifests at the repo root to run every scenario on.
read -r -a MANIFESTS <<< "${E2E_MANIFESTS:-k8s.yaml k8s-shared-pid.yaml}"
# E2E_RUN=REGEXP runs only the scenarios whose name matches (cmd/scenarios -run).
# The load and fault scenarios run on the newest version only (the last one
# given, or E2E_LOAD_ON): they add minutes, and test the node, not the minor.
LOAD_ON=${E2E_LOAD_ON:-${VERSIONS[${#VERSIONS[@]}-1]}}
LOAD_SCENARIOS='under load|mid-drain'
CACHE=${WSDRAIN_E2E_CACHE:-/var/cache/wsdrain-e2e}
# The runtime: newest containerd 2 and runc the Go module proxy serves.
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.3
RUNTIME=$CACHE/containerd-$CONTAINERD_VERSION
RUNC=$CACHE/runc-$RUNC_VERSION/runc
CTR=$RUNTIME/ctr
REPO=$(cd "$(dirname "$0")/.." && pwd)
GO_BUILDER_TAG=$(sed -n 's/^FROM .*golang:\([0-9.]*\) AS build$/\1/p' "$REPO/Dockerfile")
API_PORT=16443
ETCD_PORT=12379
BRIDGE=wsdrain0
POD_CIDR=10.244.77.0/24
NODE_IP=10.244.77.1
# The Services' range, beside the pods': routed to the bridge, so that a
# packet to a ClusterIP kube-proxy has not (yet) rewritten stays on this host.
SERVICE_CIDR=10.244.78.0/24
# A second address of this host on the bridge, outside the pods' range: the
# keep-alive scraper connects from it, so that --ignore-peer can tell it apart
# from the calls, which come from NODE_IP.
SCRAPER_IP=10.244.77.254
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

started=$(date +%s.%N)
phase_start=$started
step="start"
phase() {
  local now; now=$(date +%s.%N)
  step=$1
  awk -v p="$1" -v a="$phase_start" -v b="$now" -v s="$started" \
    'BEGIN { printf "\n### %s  (previous phase %.1fs, total %.1fs)\n", p, b - a, b - s }'
  phase_start=$now
}
die() { echo "e2e: $*" >&2; exit 1; }

# Every failure names its step, line and command: set -e alone would end the
# script without a word.
trap 'echo "e2e: FAILED at step \"$step\", line $LINENO: $BASH_COMMAND (exit status $?)" >&2' ERR

[ "$(uname -s)" = Linux ] || die "needs Linux"
[ "$(id -u)" = 0 ] || die "needs root: it starts a kubelet, containerd and network bridges"
for m in "${MANIFESTS[@]}"; do [ -f "$REPO/$m" ] || die "no manifest $REPO/$m"; done
mkdir -p "$CACHE"
exec 9> "$CACHE/run.lock"
flock -n 9 || die "another e2e run is active on this host (two kubelets cannot share one)"

# ---------------------------------------------------------------- cleanup
KUBECTL=""      # the running cluster's kubectl
W=""            # this run's work dir
C=""            # the running cluster's dir under it, one per version
# The running cluster's processes are $C/run/NAME.pid, started by
# $C/run/NAME.sh (the scenarios kill and restart some), in the order of
# $C/run/order.
created=()      # system paths this run created, removed at exit
trap cleanup EXIT
trap 'exit 130' INT TERM

# launch NAME COMMAND...: starts a cluster process, its output to
# $C/logs/NAME.log, through a script the fault scenarios start it again with.
launch() {
  local name=$1; shift
  { printf '%q ' exec "$@"; printf '>> %q 2>&1\n' "$C/logs/$name.log"; } > "$C/run/$name.sh"
  bash "$C/run/$name.sh" &
  echo $! > "$C/run/$name.pid"
  echo "$name" >> "$C/run/order"
}

remember_new() { for p in "$@"; do [ -e "$p" ] || created+=("$p"); done; }

# Shared runtime directories: only the entries this run added are removed.
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

# The host's firewall rules without counters and comments; empty, not an
# error, when there are none or no iptables at all (a fresh machine).
iptables_rules() {
  local t
  for t in iptables-save ip6tables-save; do
    command -v "$t" >/dev/null || continue
    "$t" 2>/dev/null | sed -e '/^[#:]/d' -e 's/\[[0-9:]*\]//' || true
  done
  # nftables too, where kube-proxy writes (-s: no counters).
  command -v nft >/dev/null && nft -s list ruleset 2>/dev/null || true
}

# remove_kube_proxy_tables removes the nftables tables kube-proxy made.
remove_kube_proxy_tables() {
  local t
  for t in "ip kube-proxy" "ip6 kube-proxy"; do
    grep -qxF "table $t {" "$W/iptables.before" && continue # not ours
    nft list table $t >/dev/null 2>&1 && nft delete table $t
  done
  return 0
}

# stop_cluster stops the running cluster and removes its state; run between
# versions and at exit, with errors ignored.
stop_cluster() {
  [ -n "$C" ] || return 0
  if [ -S "$C/containerd.sock" ]; then
    # Pods first, through the kubelet so that CNI releases their addresses;
    # then whatever is left, by force. Their shims outlive containerd.
    "$KUBECTL" --kubeconfig "$C/kubeconfig" delete deployment,pod --all --grace-period=1 --wait=true --timeout=40s >/dev/null 2>&1
    local ctr=("$CTR" --address "$C/containerd.sock" -n k8s.io) t
    for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks delete -f "$t" >/dev/null 2>&1; done
    for t in $("${ctr[@]}" containers ls -q 2>/dev/null); do "${ctr[@]}" containers delete "$t" >/dev/null 2>&1; done
  fi
  # Stop in reverse order of start; the API server before etcd.
  local name pid p
  for name in $(tac "$C/run/order" 2>/dev/null); do
    pid=$(cat "$C/run/$name.pid") || continue
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  remove_kube_proxy_tables
  # containerd shims started for this cluster's socket.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q -- "-address $C/containerd.sock"; then
      kill -9 "${p#/proc/}" 2>/dev/null
    fi
  done
  sleep 0.5
  # Mounts under the cluster's dir and its pods' network namespaces, deepest first.
  awk -v w="$C" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
  remove_added_entries
  C=""
}

cleanup() {
  local rc=$? summary=""
  set +eu
  trap - EXIT INT TERM ERR
  echo
  echo "### cleanup"
  stop_cluster
  if [ -n "$W" ]; then
    [ -s "$W/results.tsv" ] && summary=$("$W/images/scenarios" -summary "$W/results.tsv")
    [ -e "$W/scraper-ip.ours" ] && ip addr del "$SCRAPER_IP/24" dev "$BRIDGE" 2>/dev/null
    [ -e "$W/service-route.ours" ] && ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null
    if [ -e "$W/bridge.ours" ] && ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
    awk -v w="$W" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
  fi
  for p in "${created[@]}"; do rm -rf "$p"; done
  if [ -n "$W" ] && [ -f "$W/iptables.before" ] && ! diff -q "$W/iptables.before" <(iptables_rules) >/dev/null; then
    echo "WARNING: the firewall rules changed during the run:"; diff "$W/iptables.before" <(iptables_rules)
  fi
  [ -n "$W" ] && rm -rf "$W"
  echo "removed the work dir, mounts, bridge $BRIDGE and ${#created[@]} system paths this run created"
  [ -n "$summary" ] && echo "$summary"
  exit "$rc"
}

# ------------------------------------------------------------- preflight
phase "installing what is missing"
need_pkgs=()
for pair in buildah:buildah openssl:openssl ip:iproute2 nft:nftables gcc:gcc pkg-config:pkg-config; do
  command -v "${pair%%:*}" >/dev/null || need_pkgs+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
# runc's seccomp support is built with cgo against libseccomp.
[ -e /usr/include/seccomp.h ] || need_pkgs+=(libseccomp-dev)
command -v go >/dev/null || die "needs Go (>= 1.24) on PATH"
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "apt-get install ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
mkdir -p "$CACHE/debs"
for pkg in etcd-server busybox-static; do
  if ! ls "$CACHE/debs/$pkg"_*.deb >/dev/null 2>&1; then
    # On a fresh machine the package lists may be empty: update, then retry.
    (cd "$CACHE/debs" && apt-get download -q "$pkg" 2>/dev/null) || { apt-get update -qq; (cd "$CACHE/debs" && apt-get download -q "$pkg"); }
  fi
  if [ ! -d "$CACHE/$pkg" ]; then # unpacked aside first: an interrupted unpack is not a cache
    rm -rf "$CACHE/$pkg.tmp"
    dpkg-deb -x "$CACHE/debs/$pkg"_*.deb "$CACHE/$pkg.tmp"
    mv "$CACHE/$pkg.tmp" "$CACHE/$pkg"
  fi
done
ETCD=$CACHE/etcd-server/usr/bin/etcd
BUSYBOX=$CACHE/busybox-static/bin/busybox
[ -x "$ETCD" ] && [ -x "$BUSYBOX" ] || die "etcd or busybox missing from their Debian packages"

phase "containerd $CONTAINERD_VERSION and runc $RUNC_VERSION (built once into $CACHE)"
bash "$REPO/e2e/build-runtime.sh" containerd "$CONTAINERD_VERSION" "$RUNTIME"
bash "$REPO/e2e/build-runtime.sh" runc "$RUNC_VERSION" "${RUNC%/runc}"
"$RUNTIME/containerd" --version
"$RUNC" --version
grep -q seccomp <("$RUNC" --version) || die "$RUNC was built without seccomp"
for v in "${VERSIONS[@]}"; do
  phase "Kubernetes $v binaries (built once into $CACHE/k8s-$v)"
  bash "$REPO/e2e/build-k8s.sh" "$v" "$CACHE/k8s-$v"
done

W=$(mktemp -d /var/tmp/wsdrain-e2e.XXXXXX)
snapshot_watched
iptables_rules > "$W/iptables.before"
remember_new /run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods /run/netns /opt/cni
mkdir -p "$W"/{images,buildah}
rm -rf "$CACHE/last-failure"

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
IMAGES=(pause:1 wsapp:1 wsapp-wrapped:1 wsdrain:e2e)
for img in "${IMAGES[@]}"; do # archives, imported into each version's containerd
  bah push -q --signature-policy "$W/policy.json" "localhost/wsdrain-e2e/$img" \
    "docker-archive:$W/images/${img%%:*}.tar:localhost/wsdrain-e2e/$img" >/dev/null
done
rm -rf "$W/buildah"

# The bridge is made here, not by CNI, so that the kubelet can serve on its
# address: reachable from this host and its pods only.
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  # A fixed MAC: a bridge with a random one takes the lowest of its ports',
  # and changes it as pods come and go; the pods' ARP entries for this host
  # then point at a MAC that is gone, and its traffic stalls for seconds.
  ip link add "$BRIDGE" address 02:77:77:00:00:01 type bridge && touch "$W/bridge.ours"
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
fi
if ! ip -o addr show dev "$BRIDGE" | grep -qF " $SCRAPER_IP/"; then
  ip addr add "$SCRAPER_IP/24" dev "$BRIDGE" && touch "$W/scraper-ip.ours"
fi
if ! ip route show "$SERVICE_CIDR" | grep -q .; then
  ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP" && touch "$W/service-route.ours"
fi

# ------------------------------------------------------------- a cluster
# start_containerd starts a fresh containerd for the cluster in $C and
# imports the images.
start_containerd() {
  # containerd 2's own config format (version 3), where the CRI plugin's
  # runtime and image keys are apart; nothing read from /etc or /opt.
  cat > "$C/containerd.toml" <<EOF
version = 3
root = "$C/containerd/root"
state = "$C/containerd/state"
imports = []
[grpc]
  address = "$C/containerd.sock"
[ttrpc]
  address = "$C/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$C/containerd/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = "$C/containerd/image-verifier"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "localhost/wsdrain-e2e/pause:1"
[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$C/cni/net.d"
EOF
  cat > "$C/cni/net.d/10-wsdrain.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "wsdrain-e2e", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "rangeEnd": "10.244.77.200"}]], "dataDir": "$C/cni/ipam"}}]}
EOF
  # The shim is found on PATH, beside the containerd that starts it.
  launch containerd env PATH="$RUNTIME:$PATH" "$RUNTIME/containerd" --config "$C/containerd.toml"
  local i img
  for i in $(seq 100); do
    [ -S "$C/containerd.sock" ] && break
    [ "$i" = 100 ] && { tail -20 "$C/logs/containerd.log"; die "containerd did not start"; }
    sleep 0.1
  done
  for img in "${IMAGES[@]}"; do
    "$CTR" --address "$C/containerd.sock" -n k8s.io images import "$W/images/${img%%:*}.tar" >/dev/null
  done
  "$CTR" --address "$C/containerd.sock" -n k8s.io images ls -q | grep wsdrain-e2e
}

# start_control_plane starts etcd, kube-apiserver, kube-controller-manager
# and kube-scheduler of version $1, and writes $C/kubeconfig.
start_control_plane() {
  local bin=$CACHE/k8s-$1 i
  TOKEN=$(openssl rand -hex 16)
  echo "$TOKEN,admin,admin,system:masters" > "$C/pki/tokens.csv"
  openssl genrsa -out "$C/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$C/pki/sa.key" -pubout -out "$C/pki/sa.pub" 2>/dev/null
  cat > "$C/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$TOKEN"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin, namespace: default}}]
current-context: e2e
EOF
  launch etcd "$ETCD" --data-dir "$C/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls http://127.0.0.1:12380
  # --endpoint-reconciler-type none: 1.37 refuses a loopback advertise
  # address with the default reconciler; nothing here uses the kubernetes Service.
  # --watch-cache=false: with Debian's etcd 3.4.23 the watch cache of 1.37
  # falls behind etcd and answers watches "Too large resource version".
  launch kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --cert-dir "$C/pki/apiserver" \
    --token-auth-file "$C/pki/tokens.csv" --authorization-mode AlwaysAllow \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$C/pki/sa.pub" \
    --service-account-signing-key-file "$C/pki/sa.key" --service-cluster-ip-range "$SERVICE_CIDR" \
    --disable-admission-plugins ServiceAccount --enable-priority-and-fairness=false \
    --kubelet-preferred-address-types InternalIP --endpoint-reconciler-type none --watch-cache=false
  for i in $(seq 120); do
    "$KUBECTL" --kubeconfig "$C/kubeconfig" get --raw /readyz >/dev/null 2>&1 && break
    [ "$i" = 120 ] && { tail -20 "$C/logs/kube-apiserver.log"; die "API server not ready after 60s"; }
    sleep 0.5
  done
  launch kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$C/kubeconfig" --leader-elect=false \
    --service-account-private-key-file "$C/pki/sa.key" --use-service-account-credentials=false \
    --controllers '*,-serviceaccount-token' --bind-address 127.0.0.1 --secure-port 0
  launch kube-scheduler "$bin/kube-scheduler" --kubeconfig "$C/kubeconfig" --leader-elect=false --bind-address 127.0.0.1 --secure-port 0
}

# start_kube_proxy starts kube-proxy of version $1 in nftables mode. It must
# change nothing of the host but its own tables: conntrack sysctls are left
# as they are (0), NodePorts only on the node's bridge address, its own
# ports on loopback.
start_kube_proxy() {
  cat > "$C/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: "$C/kubeconfig"}
hostnameOverride: wsdrain-e2e
clusterCIDR: $POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:16256
metricsBindAddress: 127.0.0.1:16249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  launch kube-proxy "$CACHE/k8s-$1/kube-proxy" --config "$C/kube-proxy.yaml" --v=2
  local i
  for i in $(seq 120); do
    nft list table ip kube-proxy >/dev/null 2>&1 && break
    [ "$i" = 120 ] && { tail -20 "$C/logs/kube-proxy.log"; die "kube-proxy made no nftables table in 60s"; }
    sleep 0.5
  done
  echo "kube-proxy $1: nftables table ip kube-proxy, $(nft list table ip kube-proxy | grep -c '^\s*chain ') chains"
}

# start_kubelet starts the kubelet of version $1 and waits for the node.
start_kubelet() {
  local i
  cat > "$C/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
# 1.35 and later refuse a cgroup v1 host unless told; then they only warn.
failCgroupV1: false
containerRuntimeEndpoint: unix://$C/containerd.sock
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
podLogsDir: $C/kubelet/pod-logs
volumePluginDir: $C/kubelet/volume-plugins
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
serializeImagePulls: false
# The host's firewall is not this test's to change.
makeIPTablesUtilChains: false
EOF
  # -v=3: the kubelet then logs each preStop hook it runs and completes.
  launch kubelet "$CACHE/k8s-$1/kubelet" --config "$C/kubelet.yaml" --kubeconfig "$C/kubeconfig" --root-dir "$C/kubelet/root" \
    --cert-dir "$C/kubelet/pki" --hostname-override wsdrain-e2e --node-ip "$NODE_IP" --v=3
  for i in $(seq 240); do
    "$KUBECTL" --kubeconfig "$C/kubeconfig" get node wsdrain-e2e -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True && break
    [ "$i" = 240 ] && { grep -E '^E' "$C/logs/kubelet.log" | tail -20; die "node not Ready after 2 minutes"; }
    sleep 0.5
  done
  "$KUBECTL" --kubeconfig "$C/kubeconfig" get node -o wide
}

# run_scenarios runs every scenario on every manifest against the cluster of
# version $1, adding its rows to the summary; returns 1 when a check failed.
run_scenarios() {
  local manifests=() m skip='^$'
  [ "$1" = "$LOAD_ON" ] || skip=$LOAD_SCENARIOS
  for m in "${MANIFESTS[@]}"; do manifests+=("$REPO/$m"); done
  "$W/images/scenarios" -kubectl "$KUBECTL" -kubeconfig "$C/kubeconfig" -api "https://127.0.0.1:$API_PORT" \
    -token "$TOKEN" -manifest "$(IFS=,; echo "${manifests[*]}")" -work "$C" -kubelet-log "$C/logs/kubelet.log" \
    -wsdrain-image localhost/wsdrain-e2e/wsdrain:e2e -app-image localhost/wsdrain-e2e/wsapp:1 \
    -wrapped-app-image localhost/wsdrain-e2e/wsapp-wrapped:1 -scraper-ip "$SCRAPER_IP" -label "$1" -results "$W/results.tsv" \
    -run "${E2E_RUN:-.}" -skip "$skip" -pids "$C/run" -pod-logs "$C/kubelet/pod-logs" \
    -containerd "$CTR --address $C/containerd.sock -n k8s.io" -runtime "runc $RUNC_VERSION"
}

# ------------------------------------------------------------ each version
result=0
for v in "${VERSIONS[@]}"; do
  C=$W/$v
  KUBECTL=$CACHE/k8s-$v/kubectl
  mkdir -p "$C"/{etcd,pki,containerd,cni/net.d,cni/ipam,kubelet,logs,run}
  phase "$v: containerd $CONTAINERD_VERSION, runc $RUNC_VERSION, CNI bridge $BRIDGE on $POD_CIDR"
  start_containerd
  phase "$v: etcd, kube-apiserver, kube-controller-manager, kube-scheduler"
  start_control_plane "$v"
  phase "$v: kubelet"
  start_kubelet "$v"
  phase "$v: kube-proxy (nftables), Services on $SERVICE_CIDR"
  start_kube_proxy "$v"
  phase "$v: scenarios"
  if ! run_scenarios "$v"; then
    result=1
    mkdir -p "$CACHE/last-failure/$v" && cp "$C"/logs/*.log "$CACHE/last-failure/$v/"
    echo "component logs of $v kept in $CACHE/last-failure/$v/"
  fi
  phase "$v: stopping the cluster"
  stop_cluster || true # errors ignored, as at exit
done
phase "done"
exit "$result"
