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
# Usage: bench/dr.sh [--pairs N (default 5)] [--secs S (default 5)] [--brdivert PATH] [--aa]
#   --aa  add a second "direct" run per round (A/A: the run's own noise)
# The report gives the median of per-round ratios (each against the same round's direct run)
# and the ratio of the medians; a run whose client saw connection errors aborts the script.
# Needs root, nft, iproute2, python3. Traffic stays inside its namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=5 SECS=5 BIN=${BRDIVERT:-target/release/brdivert} AA=0
CMDLINE="bench/dr.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) PAIRS=$2; shift 2 ;; --secs) SECS=$2; shift 2 ;;
    --brdivert) BIN=$2; shift 2 ;; --aa) AA=1; shift ;;
    *) echo "unknown $1" >&2; exit 2 ;;
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
    | python3 -c 'import json,sys; d=json.load(sys.stdin)
if d["errors"]: sys.exit("%d connection errors" % d["errors"])
print(d["conns"] / d["seconds"])'
}
: >"$DIR/samples"
configs="direct dr"; ((AA)) && configs="direct dr direct2"
n=$(wc -w <<<"$configs")
for p in $(seq 1 "$PAIRS"); do
  # rotate the order every round
  set -- $configs; k=$(( (p - 1) % n )); order="${*:k+1} ${*:1:k}"
  for c in $order; do
    v=$(run "${c%2}") || { echo "round $p $c failed" >&2; exit 1; }
    echo "$p $c $v" >>"$DIR/samples"; echo "round $p $c $v conn/s"
  done
done
mkdir -p bench/results
OUT=bench/results/dr-$(date +%Y%m%d-%H%M%S).md
BUILD=$(git log -1 --format='%h %s' 2>/dev/null || echo unknown)
python3 - "$DIR/samples" "$OUT" "$PAIRS" "$SECS" "$CMDLINE" "$BIN ($BUILD)" <<'PY'
import statistics, sys
rounds = {}
for line in open(sys.argv[1]):
    p, c, v = line.split(); rounds.setdefault(int(p), {})[c] = float(v)
cfgs = [c for c in ["direct", "dr", "direct2"] if all(c in r for r in rounds.values())]
names = {"direct": "direct (plain bridge, client -> rs1)", "dr": "dr (VIP, 2 realservers)",
         "direct2": "direct again (A/A)"}
med = {c: statistics.median(r[c] for r in rounds.values()) for c in cfgs}
def ratio(c):
    v = sorted(r[c] / r["direct"] for r in rounds.values())
    return statistics.median(v), v[0], v[-1]
text = (f"# dr vs direct, connections/s ({sys.argv[3]} interleaved rounds, {sys.argv[4]} s each)\n\n"
        f"Command: `{sys.argv[5]}`; brdivert: {sys.argv[6]}\n\n"
        f"| config | median conn/s | samples (by round) |\n|---|---|---|\n")
for c in cfgs:
    text += f"| {names[c]} | {med[c]:.0f} | {', '.join(f'{r[c]:.0f}' for _, r in sorted(rounds.items()))} |\n"
text += "\n| ratio | median of per-round ratios (min-max) | ratio of medians |\n|---|---|---|\n"
for c in cfgs[1:]:
    m, lo, hi = ratio(c)
    text += f"| {c} / direct | **{m:.3f}** ({lo:.2f}-{hi:.2f}) | {med[c] / med['direct']:.3f} |\n"
m = ratio("dr")[0]
text += f"\ndr / direct: {m:.3f} -> {'meets' if m >= 0.9 else 'MISSES'} the >= 0.9 target\n"
open(sys.argv[2], "w").write(text); print(text)
PY
