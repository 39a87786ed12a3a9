#!/usr/bin/env bash
# bench/dr.sh — connections/s to a VIP through `action = "dr"` on the bridge (2 realservers)
# vs the same client to one realserver directly through a plain bridge (issue 4; target >= 0.9x).
#
#   [cl] 10.89.0.1 ==veth== pc [br: bridge 10.89.0.254/24] p1,p2 ==veth== [rs1] .11 / [rs2] .12
#   both realservers hold the VIP 10.89.0.100 on lo and run bench/cps.py serve 0.0.0.0:80;
#   the client has a permanent neighbour entry for the VIP (a MAC nobody owns).
#   direct: plain bridge (no brdivert tables), client -> rs1 address
#   dr:     `brdivert apply` of one dr rule, client -> VIP
# Interleaved pairs (order alternates), medians written to bench/results/dr-<date>.md.
# Usage: bench/dr.sh [--pairs N (default 5)] [--secs S (default 5)] [--brdivert PATH]
# Needs root, nft, iproute2, python3. Traffic stays inside its namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=5 SECS=5 BIN=${BRDIVERT:-target/release/brdivert}
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) PAIRS=$2; shift 2 ;; --secs) SECS=$2; shift 2 ;;
    --brdivert) BIN=$2; shift 2 ;; *) echo "unknown $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "no brdivert binary at $BIN (cargo build --release)" >&2; exit 1; }
P=bddr$$ VIP=10.89.0.100 DIR=$(mktemp -d)
cleanup() { for n in cl br rs1 rs2; do ip netns pids $P$n 2>/dev/null | xargs -r kill 2>/dev/null || true; ip netns del $P$n 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
for n in cl br rs1 rs2; do ip netns add $P$n; ip -n $P$n link set lo up; done
ip -n ${P}br link add br0 type bridge; ip -n ${P}br link set br0 up
ip -n ${P}br addr add 10.89.0.254/24 dev br0
i=1
for n in cl rs1 rs2; do
  ip link add eth0 netns $P$n type veth peer name p$n netns ${P}br
  ip -n $P$n link set eth0 address 02:89:00:00:00:0$i up
  ip -n ${P}br link set p$n master br0 up
  i=$((i+1))
done
ip -n ${P}cl addr add 10.89.0.1/24 dev eth0
ip -n ${P}rs1 addr add 10.89.0.11/24 dev eth0
ip -n ${P}rs2 addr add 10.89.0.12/24 dev eth0
for n in rs1 rs2; do
  ip -n $P$n addr add $VIP/32 dev lo
  ip netns exec $P$n python3 bench/cps.py serve 0.0.0.0 80 >/dev/null 2>&1 &
done
ip -n ${P}cl neigh replace $VIP lladdr 02:89:00:00:00:80 dev eth0 nud permanent
ip netns exec ${P}br sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
mkdir -p "$DIR/rules"
cat >"$DIR/brdivert.toml" <<EOT
rules = ["$DIR/rules/*.toml"]
[bridge]
name = "br0"
ports = ["pcl", "prs1", "prs2"]
address = ["10.89.0.254/24"]
EOT
cat >"$DIR/rules/dr.toml" <<EOT
[[divert]]
name = "vip"
from = ["pcl"]
proto = "tcp"
dport = 80
dst = "$VIP"
action = "dr"
realservers = [{ mac = "02:89:00:00:00:02" }, { address = "10.89.0.12" }]
EOT
sleep 1
run() { # config -> conn/s
  if [ "$1" = dr ]; then
    ip netns exec ${P}br env BRDIVERT_STATE_DIR="$DIR/state" "$BIN" apply -c "$DIR/brdivert.toml" >/dev/null
    dst=$VIP
  else
    ip netns exec ${P}br nft flush ruleset; dst=10.89.0.11
  fi
  ip netns exec ${P}cl python3 bench/cps.py connect $dst 80 "$SECS" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["conns"] / d["seconds"])'
}
: >"$DIR/samples"
for p in $(seq 1 "$PAIRS"); do
  if [ $((p % 2)) = 1 ]; then order="direct dr"; else order="dr direct"; fi
  for c in $order; do v=$(run $c); echo "$c $v" >>"$DIR/samples"; echo "pair $p $c $v conn/s"; done
done
mkdir -p bench/results
OUT=bench/results/dr-$(date +%Y%m%d-%H%M%S).md
python3 - "$DIR/samples" "$OUT" "$PAIRS" "$SECS" <<'PY'
import statistics, sys
s = {}
for line in open(sys.argv[1]):
    c, v = line.split(); s.setdefault(c, []).append(float(v))
d, r = statistics.median(s["direct"]), statistics.median(s["dr"])
text = (f"# dr vs direct, connections/s ({sys.argv[3]} interleaved pairs, {sys.argv[4]} s each)\n\n"
        f"| config | median conn/s | samples |\n|---|---|---|\n"
        f"| direct (plain bridge, client -> rs1) | {d:.0f} | {', '.join(f'{x:.0f}' for x in s['direct'])} |\n"
        f"| dr (VIP, 2 realservers) | {r:.0f} | {', '.join(f'{x:.0f}' for x in s['dr'])} |\n\n"
        f"ratio dr/direct: {r / d:.3f} (target >= 0.9)\n")
open(sys.argv[2], "w").write(text); print(text)
PY
