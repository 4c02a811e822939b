# bench/hold.sh, sourced by the benchmark scripts inside a fresh network
# namespace: brings lo up and defines hold.
set -euo pipefail
ip link set lo up

# hold PORT N [CLOSES_PER_SECOND]: N established connections on PORT, held by
# wsdrain.test processes ($T/wsdrain.test) of at most 8 000 each: two fds a
# connection, under the hard limit of 20 000 open files. Each holder has its
# own loopback address, so ephemeral ports never run short. The closing rate
# is shared out among them; SIGUSR1 starts it. Sets holders to their pids.
hold() {
  local port=$1 left=$2 rate=${3:-0} per=8000 k=0 m
  local procs=$(( ($2 + per - 1) / per ))
  holders=()
  while [ "$left" -gt 0 ]; do
    m=$(( left < per ? left : per ))
    rm -f "$T/holder.$port.$k"
    WSDRAIN_TEST_ROLE=holder "$T/wsdrain.test" "127.$((port % 256)).0.$((k + 2)):$port" "$m" \
      "$(awk -v r="$rate" -v p="$procs" 'BEGIN { print r / p }')" > "$T/holder.$port.$k" &
    holders+=($!)
    until grep -qs ready "$T/holder.$port.$k"; do
      kill -0 "${holders[-1]}" 2>/dev/null || { echo "holder $k failed" >&2; exit 1; }
      sleep 0.2
    done
    left=$((left - m)) k=$((k + 1))
  done
}
