#!/bin/bash
# bench/userspace_outage.sh — how long bridging stops when the userspace datapath process is
# killed (SIGKILL) and started again at once: 10 ms pings client -> server through it,
# lost pings x 10 ms = the outage. A supervisor adds its own delay (systemd RestartSec,
# default 100 ms). Run from the repository root after
# `cargo build --release --example userspace_bridge`. Needs root, iproute2, ping.
set -e
P=ot$$; C=$P-c S=$P-s B=$P-b
W=$(mktemp -d)
BIN=target/release/examples/userspace_bridge
trap 'kill $DP 2>/dev/null; wait $DP 2>/dev/null; for n in $C $S $B; do ip netns pids $n | xargs -r kill 2>/dev/null; ip netns del $n; done; rm -rf $W' EXIT
for n in $C $S $B; do ip netns add $n; ip -n $n link set lo up; done
ip link add pc netns $B type veth peer name eth0 netns $C
ip link add ps netns $B type veth peer name eth0 netns $S
for p in pc ps; do ip -n $B link set $p up; done
ip -n $C addr add 10.89.0.1/24 dev eth0; ip -n $C link set eth0 up
ip -n $S addr add 10.89.0.2/24 dev eth0; ip -n $S link set eth0 up
printf 'rules = []\n[bridge]\nname = "ubr0"\nports = ["pc", "ps"]\ndatapath = "userspace"\naddress = ["10.89.0.254/24"]\n' > $W/s.toml
start() { ip netns exec $B env BRDIVERT_STATE_DIR=$W/st $BIN $W/s.toml 2>$W/log & DP=$!; }
start; sleep 1
ip netns exec $C ping -c1 -W2 10.89.0.2 >/dev/null
ip netns exec $C ping -i 0.01 -c 300 -W 1 10.89.0.2 > $W/ping.txt &
PING=$!
sleep 1
t0=$(date +%s%N)
kill -KILL $DP; wait $DP 2>/dev/null || true
start
t1=$(date +%s%N)
wait $PING || true
echo "kill -9 + restart command: $(( (t1-t0)/1000000 )) ms"
grep -E "packets transmitted" $W/ping.txt
