#!/usr/bin/env bash
# bench/drain.sh: the stopper while a pod drains, in private namespaces.
#   reaction: last close → app's SIGTERM, p50/p99 over DRAINS drains with
#             --interval 5s, with 0 and 10 000 other connections on port 9090,
#             and with connections reset as fast as one process can on 9090;
#   churn:    the stopper's CPU over 10 s of drain, one call on the target
#             port, that churn on 9090, and the events the kernel dropped;
#   cost:     the stopper's CPU per second of drain with N connections on the
#             target port, (a) none closing, (b) 200 closing a second.
# Network and PID namespaces of its own, as in a pod: the stopper looks for
# the app among few processes. Prints the figures that BENCHMARKS.md records.
# Needs root and Go.
#   ./bench/drain.sh [DRAINS [reaction|churn|cost]]   default: 100, all three
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: needs root to create namespaces" >&2; exit 1; }
DRAINS=${1:-100}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
go build -trimpath -ldflags "-s -w" -o "$T/wsdrain" .
go test -c -o "$T/wsdrain.test" .
cp /bin/sleep "$T/wsbenchapp" # a stand-in app with a name no other process has
export T

# in_pod TITLE ARG...: runs the script on stdin with ARGs in network and PID
# namespaces of its own, after a heading with the machine's load. The stopper
# runs under "unshare --mount", out of PID 1's mount namespace, as in a pod
# with shareProcessNamespace (else it would leave the signal to a kubelet).
in_pod() {
  printf '\n== %s (load: %s)\n' "$1" "$(cut -d' ' -f1-3 /proc/loadavg)"
  shift
  unshare --net --pid --fork --mount-proc bash -s "$@"
}

echo "machine: $(nproc) cores, kernel $(uname -r), $(go version | cut -d' ' -f3)"
want() { [ -z "${2:-}" ] || [ "$2" = "$1" ]; }

# churn_on PORT: connections reset as fast as one process can, on PORT.
churn_on() {
  WSDRAIN_TEST_ROLE=churn "$T/wsdrain.test" "127.0.0.1:$1" > "$T/churn" &
  holders+=($!)
  until grep -qs ready "$T/churn"; do sleep 0.2; done
}
export -f churn_on

want reaction "${2:-}" && for other in 0 10000 churn; do
  in_pod "reaction, $DRAINS drains, --interval 5s, $other other connections on port 9090" "$other" "$DRAINS" <<'INNER'
other=$1 drains=$2
source bench/hold.sh
if [ "$other" = churn ]; then
  holders=()
  churn_on 9090
else
  hold 9090 "$other"
fi
cd "$T"
WSDRAIN_BENCH_PORT=8080 unshare --mount ./wsdrain.test -test.run '^$' -test.bench Reaction -test.benchtime "${drains}x" | grep -E '^Benchmark'
[ ${#holders[@]} = 0 ] || kill "${holders[@]}"
wait
INNER
done

want churn "${2:-}" && in_pod "stopper CPU, one call on port 8080, churn on port 9090, 10s of drain" <<'INNER'
source bench/hold.sh
hold 8080 1
churn_on 9090
opens() { awk '/^Tcp:/ && $6 ~ /^[0-9]+$/ { print $6 }' /proc/net/snmp; } # ActiveOpens
o1=$(opens)
/usr/bin/time -f "stopper: user %U s, system %S s, wall %e s" unshare --mount "$T/wsdrain" stopper --target-port 8080 \
  --fifo "$T/churn.fifo" --interval 1s --min-drain 0s --timeout 10s 2> "$T/stopper.log" &
sleep 9
echo "churn: $(( ($(opens) - o1) / 9 )) connections reset a second on port 9090"
echo "events the kernel dropped: $(awk '$2 == 4 && $4 == "00000005" { print $9 }' /proc/net/netlink)"
wait $! || true
grep -E '^stopper:' "$T/stopper.log"
kill "${holders[@]}" 2>/dev/null || true
wait
INNER

want cost "${2:-}" && for n in 18000 50000; do
  for rate in 0 200; do
    in_pod "stopper CPU, $n connections on port 8080, $rate closing a second, 10s of drain" "$n" "$rate" <<'INNER'
n=$1 rate=$2
source bench/hold.sh
hold 8080 "$n" "$rate"
mkdir -p "$T/ns.$n.$rate"
"$T/wsbenchapp" 600 &
app=$!
kill -USR1 "${holders[@]}"
/usr/bin/time -f "stopper: user %U s, system %S s, wall %e s" unshare --mount "$T/wsdrain" stopper --target-port 8080 \
  --fifo "$T/ns.$n.$rate/drain.fifo" --interval 1s --min-drain 0s --timeout 10s \
  2> "$T/stopper.log" || true
grep -E '^stopper:|events=|counts_from' "$T/stopper.log" | sed 's/^time=[^ ]* //' | cut -c1-160
awk '/^stopper:/ { printf "stopper CPU per second of drain: %.1f%% of one core\n", ($3 + $6) * 100 / $9 }' "$T/stopper.log"
echo "connections left: $(grep -o 'connections=[0-9]*' "$T/stopper.log" | tail -1)"
kill "${holders[@]}" "$app" 2>/dev/null || true
wait
INNER
  done
done
