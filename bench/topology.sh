# bench/topology.sh — sourced by bench/kernel.sh and bench/queue.sh: their shared topology.
#
#   [client ns NSC] eth0 CLI/24 ==veth== pc [bridge ns NSB: bridge BR, BRADDR] ps ==veth== eth0 SRV/24 [server ns NSS]
#
# The caller sets NSC NSB NSS BR BRADDR CLI SRV and defines log() and die().

inb() { ip netns exec "$NSB" "$@"; }
inc() { ip netns exec "$NSC" "$@"; }
ins() { ip netns exec "$NSS" "$@"; }

# Build the namespaces, veths and bridge; br_netfilter's namespace sysctls off (as brdivert
# leaves them); wait until the client reaches the server through the bridge.
topology_up() {
    log "namespaces $NSC / $NSB / $NSS, bridge $BR, work dir $WORK"
    for ns in "$NSC" "$NSB" "$NSS"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip link add eth0 netns "$NSC" type veth peer name pc netns "$NSB"
    ip link add eth0 netns "$NSS" type veth peer name ps netns "$NSB"
    ip -n "$NSB" link add "$BR" type bridge stp_state 0 forward_delay 0
    for p in pc ps; do
        ip -n "$NSB" link set "$p" master "$BR"
        ip -n "$NSB" link set "$p" up
    done
    ip -n "$NSB" addr add "$BRADDR" dev "$BR"
    ip -n "$NSB" link set "$BR" up
    ip -n "$NSC" addr add "$CLI/24" dev eth0
    ip -n "$NSS" addr add "$SRV/24" dev eth0
    ip -n "$NSC" link set eth0 up
    ip -n "$NSS" link set eth0 up
    local f i
    for f in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
        if inb test -e "/proc/sys/net/bridge/$f"; then
            inb sh -c "echo 0 > /proc/sys/net/bridge/$f"
        fi
    done
    for i in $(seq 1 50); do
        inc ping -c1 -W1 -q "$SRV" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "client cannot reach server through the bridge"
}

# Kill what this script started in its namespaces (by PID, nothing else); then, after
# `topology_down`, delete them.
topology_stop_processes() {
    local ns pid
    for ns in "$NSC" "$NSB" "$NSS"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    sleep 0.2
}

topology_down() {
    local ns pid
    for ns in "$NSC" "$NSB" "$NSS"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
}
