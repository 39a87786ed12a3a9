#!/usr/bin/env bash
# bench/userspace.sh — brdivert's userspace datapath vs the kernel bridge (issue 5).
#
#   [client ns] eth0 10.89.0.1 ==veth== pc [bridge ns] ps ==veth== eth0 10.89.0.2 [server ns]
#
# The bridge ns bridges pc and ps either with a kernel bridge (`kernel`: ip link type bridge,
# no nft rules) or with brdivert's userspace datapath (`user`: examples/userspace_bridge with
# an empty policy, TAP local port ubr0 10.89.0.254/24). Configurations alternate every round
# (order rotated), same veths throughout. Per run:
#   tcp  iperf3 TCP, one stream, Gbit/s received
#   udp  iperf3 -u -l 18 -b 0 (60-byte frames + FCS = 64 bytes on the wire), frames/s
#        received at the server's eth0 (rx_packets delta / seconds)
# Endpoints keep their default offloads (tx checksum and TSO on): the userspace datapath
# carries vnet headers, so it needs no endpoint tuning.
#
# Usage: bench/userspace.sh [--rounds N] [--secs S] [--out FILE]
#   defaults: 3 rounds, 4 s runs. Needs root, iperf3, iproute2, python3, cargo.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ROUNDS=3 SECS=4 OUT=""
CMDLINE="bench/userspace.sh${*:+ $*}"
while (($#)); do
    case "$1" in
        --rounds) ROUNDS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$REPO/bench/results/userspace-$(date +%F).md}

(cd "$REPO" && cargo build --release --example userspace_bridge >/dev/null 2>&1)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/userspace_bridge

P=ub$$
C=$P-c S=$P-s B=$P-b
WORK=$(mktemp -d)
DP_PID=""
cleanup() {
    [[ -n $DP_PID ]] && kill -TERM "$DP_PID" 2>/dev/null && wait "$DP_PID" 2>/dev/null || true
    for n in $C $S $B; do
        ip netns pids "$n" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

for n in $C $S $B; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip link add pc netns "$B" type veth peer name eth0 netns "$C"
ip link add ps netns "$B" type veth peer name eth0 netns "$S"
for p in pc ps; do ip -n "$B" link set "$p" addrgenmode none; ip -n "$B" link set "$p" up; done
ip -n "$C" addr add 10.89.0.1/24 dev eth0; ip -n "$C" link set eth0 up
ip -n "$S" addr add 10.89.0.2/24 dev eth0; ip -n "$S" link set eth0 up
ip netns exec "$S" iperf3 -s -D -I "$WORK/iperf3.pid" >/dev/null

cat >"$WORK/brdivert.toml" <<TOML
rules = []
[bridge]
name = "ubr0"
ports = ["pc", "ps"]
datapath = "userspace"
address = ["10.89.0.254/24"]
TOML

up_kernel() {
    ip -n "$B" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$B" link set pc master br0; ip -n "$B" link set ps master br0
    ip -n "$B" link set br0 up
}
down_kernel() { ip -n "$B" link del br0; }
up_user() {
    ip netns exec "$B" env BRDIVERT_BATCH="${BRDIVERT_BATCH:-64}" BRDIVERT_STATE_DIR="$WORK/state" "$BIN" "$WORK/brdivert.toml" 2>"$WORK/dp.log" &
    DP_PID=$!
    for _ in $(seq 50); do grep -q running "$WORK/dp.log" 2>/dev/null && break; sleep 0.1; done
}
down_user() { kill -TERM "$DP_PID"; wait "$DP_PID" || true; DP_PID=""; }

wait_path() {
    for _ in $(seq 50); do
        ip netns exec "$C" ping -c1 -W1 10.89.0.2 >/dev/null 2>&1 && return 0
    done
    echo "no path through the bridge" >&2; return 1
}
tcp() {
    ip netns exec "$C" iperf3 -c 10.89.0.2 -t "$SECS" -J |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
rx() { ip netns exec "$S" cat /sys/class/net/eth0/statistics/rx_packets; }
udp() {
    local a b
    a=$(rx)
    ip netns exec "$C" iperf3 -c 10.89.0.2 -u -l 18 -b 0 -t "$SECS" >/dev/null
    b=$(rx)
    echo $(( (b - a) / SECS ))
}

declare -A TCP UDP
configs=(kernel user)
for ((r = 0; r < ROUNDS; r++)); do
    order=("${configs[@]}")
    ((r % 2)) && order=(user kernel)
    for c in "${order[@]}"; do
        "up_$c"; wait_path
        t=$(tcp); sleep 0.5; u=$(udp)
        "down_$c"
        TCP[$c]+="$t "; UDP[$c]+="$u "
        echo "round $r $c: tcp $t Gbit/s, udp64 $u frames/s" >&2
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
{
    echo "# userspace datapath vs kernel bridge — $(date -u +%FT%TZ)"
    echo
    echo "Command: \`$CMDLINE\` ($ROUNDS interleaved rounds, ${SECS} s runs; $(nproc) CPUs, kernel $(uname -r))."
    echo "Userspace datapath: AF_PACKET + PACKET_VNET_HDR, recvmmsg/sendmmsg, batch 64, one thread per port."
    echo
    echo "| config | TCP Gbit/s (median) | runs | UDP 64-byte frames/s (median) | runs |"
    echo "|---|---|---|---|---|"
    for c in kernel user; do
        echo "| $c | $(echo "${TCP[$c]}" | median) | ${TCP[$c]}| $(echo "${UDP[$c]}" | median) | ${UDP[$c]}|"
    done
} | tee "$OUT"
