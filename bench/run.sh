#!/usr/bin/env bash
# bench/run.sh: CPU and allocations per connection count, for N established
# loopback connections in a private network namespace, and the proxy's
# footprint. Prints the table that BENCHMARKS.md records. Needs root (for the
# namespace), Go, and ss from iproute2.
#   ./bench/run.sh [N ...]      default: 1000 10000 50000
#   BENCH=CountNetlink ./bench/run.sh 18000 50000
#                               only the benchmarks matching BENCH (a go test
#                               -bench pattern; default: all counting ones)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: needs root to create a network namespace" >&2; exit 1; }
command -v ss >/dev/null || { echo "bench: needs ss (apt-get install iproute2)" >&2; exit 1; }
sizes=("${@:-1000}")
[ $# -gt 0 ] || sizes=(1000 10000 50000)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
go build -trimpath -ldflags "-s -w" -o "$T/wsdrain" .
go test -c -o "$T/wsdrain.test" .
PORT=8080

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r), $(go version | cut -d' ' -f3)"
for n in "${sizes[@]}"; do
  echo
  echo "== $n established connections on port $PORT (plus their $n client ends)"
  unshare --net bash -s "$n" "$T" "$PORT" "${BENCH:-Count|Process|ReadProc}" <<'INNER'
n=$1 T=$2 PORT=$3 BENCH=$4
source bench/hold.sh
hold "$PORT" "$n"
k=${#holders[@]}
echo "holders: $k processes; ss counts $(ss -Htn state established "( sport = :$PORT )" | wc -l)"
cd "$T"
WSDRAIN_BENCH_PORT=$PORT WSDRAIN_BIN=$T/wsdrain ./wsdrain.test -test.run '^$' -test.benchmem \
  -test.bench "$BENCH" -test.benchtime 2s -test.count 3 | grep -E '^Benchmark' | tee "$T/out.txt"
# The median of three runs of each, as the machine's noise is a few per cent.
awk '
  { name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
    for (i = 3; i < NF; i++) if ($(i+1) == "cpu-ms/op") v[name, ++n[name]] = $i }
  END {
    for (k in n) { a = v[k, 1]; b = v[k, 2]; c = v[k, 3]
      cpu[k] = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b)) }
    printf "median cpu-ms per count:"
    for (k in cpu) printf " %s=%s", k, cpu[k]
    printf "\n"
    nl = cpu["CountNetlink"]; pr = cpu["CountProc"]; nv = cpu["CountNaive"]
    rd = cpu["ReadProcDiscard"]; ws = cpu["ProcessWsdrainCount"]; ss = cpu["ProcessSS"]
    id = cpu["CountNetlinkIdle"]; pe = cpu["CountNetlinkPeer"]
    if (nl && pr && nv && rd && ws && ss)
      printf "ratios: /proc path / netlink %.1fx; naive / netlink %.1fx; /proc path / read-and-discard %.2f; ss / wsdrain count %.1fx\n", pr / nl, nv / nl, pr / rd, ss / ws
    if (nl && id && pe)
      printf "ratios: --ignore-idle / plain netlink %.2fx; --ignore-peer / plain netlink %.2fx\n", id / nl, pe / nl
  }' "$T/out.txt"
kill "${holders[@]}"
wait
INNER
done

[ -z "${BENCH:-}" ] || exit 0
echo
echo "== the proxy: one readiness probe direct to the app vs through wsdrain proxy, 10 000 each"
(cd "$T" && WSDRAIN_BIN=$T/wsdrain ./wsdrain.test -test.run '^$' -test.bench 'Probe' -test.benchtime 10000x | grep -E '^Benchmark')

echo
echo "== the proxy's peak RSS under 3 000 connections held for 5 s"
(cd "$T" && WSDRAIN_BIN=$T/wsdrain ./wsdrain.test -test.run '^$' -test.bench 'ProxyFlood' -test.benchtime 1x | grep -E '^Benchmark')
