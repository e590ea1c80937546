#!/usr/bin/env bash
# Same-day figures for docs/scaling.md: `confab bench MODE [FLAGS…]` in
# three setups, alternating, ROUNDS times (default 2):
#   embedded  one node, SQLite;
#   one-node  one node on PostgreSQL;
#   cluster   three nodes on PostgreSQL and Redis behind HAProxy (round
#             robin, PROXY protocol), the users spread over them.
# PostgreSQL (fsync on) and Redis are private ones on random ports
# (examples/bench_services.rs); their CPU, and HAProxy's, is reported as
# "infra", apart from the nodes'. JSON reports go to target/bench-cluster/.
#
#   scripts/bench-cluster.sh throughput --runs 3 --duration 5 --warmup 2
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: $0 throughput|latency [bench flags]}
shift
rounds=${ROUNDS:-2}
out=target/bench-cluster
mkdir -p "$out"
cargo build --release --locked --bin confab --example bench_services

coproc SERVICES { target/release/examples/bench_services; }
while read -r line <&"${SERVICES[0]}"; do
    case $line in
        READY=1) break ;;
        *=*) declare "$line" ;;
    esac
done
: "${DATABASE_CLUSTER:?bench_services did not start}"

bench() {
    target/release/confab bench "$mode" --json "$@" >"$file"
}
for round in $(seq 1 "$rounds"); do
    for setup in embedded one-node cluster; do
        file="$out/$mode-$setup-$round.json"
        echo "round $round: $setup" >&2
        case $setup in
            embedded) bench "$@" ;;
            one-node) bench --database "$DATABASE_ONE_NODE" --infra-pid "$INFRA_PIDS" "$@" ;;
            cluster) bench --nodes 3 --database "$DATABASE_CLUSTER" --redis "$REDIS" \
                --haproxy --infra-pid "$INFRA_PIDS" "$@" ;;
        esac
    done
done

python3 - "$out" "$mode" "$rounds" <<'PY'
import json, statistics, sys
out, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for setup in ["embedded", "one-node", "cluster"]:
    runs = [json.load(open(f"{out}/{mode}-{setup}-{r}.json"))["median"] for r in range(1, rounds + 1)]
    med = lambda f: statistics.median(f(r) or 0 for r in runs)
    rows.append((setup,
                 med(lambda r: r["delivered_per_second"]),
                 med(lambda r: r["server_cpu_us_per_message"]),
                 med(lambda r: r.get("infra_cpu_us_per_message")),
                 med(lambda r: r["send_to_deliver"]["p50_ms"]),
                 med(lambda r: r["send_to_deliver"]["p99_ms"])))
base = rows[0][2] or 1
print(f"{mode}, median of {rounds} rounds")
print(f"{'setup':<10} {'delivered/s':>12} {'nodes us/msg':>13} {'infra us/msg':>13} {'total/embedded':>15} {'p50 ms':>8} {'p99 ms':>8}")
for setup, rate, cpu, infra, p50, p99 in rows:
    print(f"{setup:<10} {rate:>12.0f} {cpu:>13.1f} {infra:>13.1f} {(cpu + infra) / base:>15.2f} {p50:>8.2f} {p99:>8.2f}")
PY
