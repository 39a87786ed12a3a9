#!/usr/bin/env bash
# bench/userspace.sh — kernel bridge vs brdivert's userspace datapath vs Open vSwitch's netdev
# (userspace) datapath, interleaved in one run on the same namespaces (issue 5).
#
#   [client ns] eth0 10.89.0.1 ==veth== pc [bridge ns] ps ==veth== eth0 10.89.0.2 [server ns]
#
# Configurations (the bridge ns bridges pc and ps with ...):
#   kernel        a kernel bridge (ip link type bridge, STP off, no nft rules)
#   user          brdivert's userspace datapath: examples/userspace_bridge, empty policy,
#                 TAP local port ubr0 10.89.0.254/24 (started fresh every round)
#   ovs           Open vSwitch, datapath_type=netdev, NORMAL forwarding: a private
#                 ovsdb-server + ovs-vswitchd started fresh every round (bench/ovs.sh)
#   kernel-txoff  kernel, with the endpoints' tx checksum offload off (OVS's setting)
#   user-txoff    user, with the endpoints' tx checksum offload off (OVS's setting)
#   user2         user, with the binary given by --bin2 (A/B of two builds in one run;
#                 the report then compares user2 with user round by round)
#   loop          the floor of the technique: examples/afpacket_copy_loop, one thread per
#                 direction copying frames (vnet header included) from one AF_PACKET socket
#                 to the other with the datapath's port I/O; no FDB, policy, TAP or ring
# Endpoints (client and server eth0) keep their default offloads (tx checksum, TSO) in
# kernel and user; OVS's netdev datapath reads frames over AF_PACKET without vnet headers,
# so a checksum-partial frame would reach the receiver with a bad checksum: ovs (always) and
# the *-txoff columns run with `ethtool -K eth0 tx off` on both endpoints, which also turns
# TSO off (the stack then sends MTU-sized frames). The *-txoff columns compare everything
# with OVS on equal endpoint settings.
# Every round runs every configuration (order rotated), on the same veths. Per run:
#   tcp      iperf3 TCP, one stream, SECS s: Gbit/s received
#   udp      iperf3 -u -l 18 -b 0 (60-byte frames + FCS = 64 bytes on the wire): frames/s
#            received at the server's eth0 (rx_packets delta / SECS)
#   cps      bench/cps.py: TCP connections/s (connect, server's FIN, close)
#   cpu_udp  CPU per packet: UDP 64-byte frames at a FIXED rate (--cpu-pps, below every
#            datapath's capacity), busy CPU of the whole machine over the run (wall time x
#            CPUs - idle - iowait from /proc/stat; with NO_HZ the idle time is measured at idle
#            entry/exit, exact, while the busy fields are tick samples that miss most of a
#            light bursty load) / frames received at the server, in ns per frame. Same method
#            for every configuration: the kernel bridge's work is in softirq and cannot be
#            attributed to a process, so nothing is attributed; sender and receiver cost the
#            same in every configuration, so differences are the datapath's. The datapath
#            process's own run time (user, ovs; /proc/PID/task/*/schedstat) is shown beside it.
#   cpu_tcp  the same for TCP at a fixed rate (--cpu-mbit): busy CPU ns per 1448 bytes of
#            payload received (one MSS-sized packet's worth; with TSO fewer, bigger frames)
# At a fixed rate the CPU figure is not just the inverse of the throughput (with -b 0 the
# machine is saturated in every configuration). A run that does not reach 95% of the fixed
# rate is flagged in the report. Background: 2 s of the idle machine per round (reported).
#
# Usage: bench/userspace.sh [--rounds N] [--secs S] [--configs LIST] [--only LIST]
#                           [--cpu-pps N] [--cpu-mbit N] [--bin PATH] [--bin2 PATH]
#                           [--loop-bin PATH] [--out FILE]
#   defaults: 3 rounds, 4 s runs, all five configurations, all metrics, 50000 pps, 500 Mbit/s
#   (about 2 minutes per round with the defaults; 5 rounds of 4 s: about 11 minutes)
#   --configs LIST  comma-separated subset of kernel,user,ovs,kernel-txoff,user-txoff,user2,
#                   loop
#                   (kernel is always measured: it is the baseline of every ratio)
#   --only LIST     comma-separated subset of tcp,udp,cps,cpu_udp,cpu_tcp
#   --bin PATH      userspace_bridge binary (default: build it with cargo, release)
#   --bin2 PATH     the userspace_bridge binary of `user2` (required with it)
#   --loop-bin PATH the afpacket_copy_loop binary of `loop` (default: build it, release)
#   --out FILE      report (default bench/results/userspace-<date>.md; -<HHMM> added if taken)
#   --halt-poll NS  set the guest's cpuidle halt polling (/sys/module/haltpoll/parameters/
#                   guest_halt_poll_ns) to NS for the run and restore it after; on a VM with
#                   it at 0 every wake-up of an idle vCPU costs a VM exit, which hurts the
#                   kernel bridge's connections/s and flatters a busy-polling datapath. The
#                   value in force is recorded in the report either way.
# Environment for `user`: BRDIVERT_THREADS, BRDIVERT_SPIN_US (forwarding threads and busy
# poll, [bridge] threads / busy_poll_us; unset: the datapath's defaults), BRDIVERT_BATCH,
# BRDIVERT_RX_RING=0 (receive with recvmmsg instead of the mapped ring).
# Needs root, iperf3, iproute2, ethtool, python3, cargo (for user*), Open vSwitch (for ovs:
# Debian package openvswitch-switch; the system service need not run and is never touched).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LIB="$HERE/userspace_lib.py"
# the datapath's experiment knobs, when set, are part of the command (examples/userspace_bridge)
CMDLINE="$(env | { grep -E '^BRDIVERT_(BATCH|THREADS|SPIN_US|RX_RING)=' || true; } | sort | tr '\n' ' ')bench/userspace.sh${*:+ $*}"
ROUNDS=3 SECS=4 OUT="" BIN="" BIN2="" LOOP_BIN="" CPU_PPS=50000 CPU_MBIT=500 HALT_POLL_NS=""
CONFIGS_ARG=kernel,user,ovs,kernel-txoff,user-txoff ONLY=tcp,udp,cps,cpu_udp,cpu_tcp
while (($#)); do
    case "$1" in
        --rounds) ROUNDS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --configs) CONFIGS_ARG=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --cpu-pps) CPU_PPS=$2; shift ;;
        --cpu-mbit) CPU_MBIT=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --bin2) BIN2=$2; shift ;;
        --loop-bin) LOOP_BIN=$2; shift ;;
        --out) OUT=$2; shift ;;
        --halt-poll) HALT_POLL_NS=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "userspace.sh: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# Configurations: kernel first (the baseline), the rest in the canonical order.
CONFIGS=(kernel)
for c in user user2 loop ovs kernel-txoff user-txoff; do
    [[ ,$CONFIGS_ARG, == *,$c,* ]] && CONFIGS+=("$c")
done
for c in ${CONFIGS_ARG//,/ }; do
    [[ " kernel user user2 loop ovs kernel-txoff user-txoff " == *" $c "* ]] || die "unknown configuration '$c'"
done
for m in ${ONLY//,/ }; do
    [[ " tcp udp cps cpu_udp cpu_tcp " == *" $m "* ]] || die "unknown metric '$m' in --only"
done
has_config() { [[ " ${CONFIGS[*]} " == *" $1 "* ]]; }
wants() { [[ ,$ONLY, == *,$1,* ]]; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $SECS =~ ^[1-9][0-9]*$ ]] || die "--rounds and --secs take positive integers"

# ---------------------------------------------------------------------------------------
# dependencies

[[ $EUID -eq 0 ]] || die "needs root (network namespaces)"
for t in iperf3 ip ethtool python3 ping; do
    command -v "$t" >/dev/null || die "missing $t (Debian: apt-get install iperf3 iproute2 ethtool python3 iputils-ping)"
done
# shellcheck source=bench/ovs.sh
source "$HERE/ovs.sh"
if has_config ovs && ! ovs_deps; then
    die "the ovs configuration needs Open vSwitch (ovsdb-tool, ovsdb-server, ovs-vswitchd, ovs-vsctl, ovs-appctl, $OVS_SCHEMA).
  Install it with:  apt-get install -y openvswitch-switch
  (the script starts its own ovsdb-server and ovs-vswitchd with private paths in its work dir;
  the system service need not run and is never touched), or leave ovs out: --configs kernel,user"
fi
# example_binary NAME GIVEN OPTION: the path of examples/NAME, GIVEN (from OPTION) or built
# here (release); dies if there is none
example_binary() {
    local bin=$2
    if [[ -z $bin ]]; then
        command -v cargo >/dev/null || die "missing cargo (or give $3 PATH to a built $1)"
        log "building examples/$1 (release)"
        (cd "$REPO" && cargo build --release --example "$1" >/dev/null 2>&1) ||
            die "cargo build --release --example $1 failed"
        bin=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/$1
    fi
    [[ -x $bin ]] || die "no $1 binary at $bin"
    realpath "$bin"
}
if has_config user || has_config user-txoff; then
    BIN=$(example_binary userspace_bridge "$BIN" --bin)
fi
if has_config user2; then
    [[ -n $BIN2 && -x $BIN2 ]] || die "the user2 configuration needs --bin2 PATH to a built userspace_bridge"
    BIN2=$(realpath "$BIN2")
fi
if has_config loop; then
    LOOP_BIN=$(example_binary afpacket_copy_loop "$LOOP_BIN" --loop-bin)
fi

# ---------------------------------------------------------------------------------------
# names (unique per run) and cleanup

ID=ub$$
C=$ID-c S=$ID-s B=$ID-b
OBR=${ID}o                             # OVS bridge (and its internal TAP) in the bridge ns
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
OVS_NS=$B OVS_DIR=$WORK/ovs
DP_PID="" UP=""
HALT_POLL_PARAM=/sys/module/haltpoll/parameters/guest_halt_poll_ns HALT_POLL_WAS=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $HALT_POLL_WAS ]] && echo "$HALT_POLL_WAS" >"$HALT_POLL_PARAM"
    if [[ -n $DP_PID ]]; then kill -TERM "$DP_PID" 2>/dev/null; wait "$DP_PID" 2>/dev/null; fi
    ovs_stop
    # Whatever else this script started inside its own namespaces (by PID, nothing else).
    for n in $C $S $B; do
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    sleep 0.2
    for n in $C $S $B; do
        for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$n" 2>/dev/null
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ -n $HALT_POLL_NS ]]; then
    [[ -w $HALT_POLL_PARAM ]] || die "--halt-poll: no $HALT_POLL_PARAM here (not a guest with the haltpoll cpuidle driver)"
    HALT_POLL_WAS=$(cat "$HALT_POLL_PARAM")
    echo "$HALT_POLL_NS" >"$HALT_POLL_PARAM"
fi

inb() { ip netns exec "$B" "$@"; }
inc() { ip netns exec "$C" "$@"; }
ins() { ip netns exec "$S" "$@"; }

# ---------------------------------------------------------------------------------------
# topology

log "namespaces $C / $B / $S, work dir $WORK; configs ${CONFIGS[*]}; metrics $ONLY"
for n in $C $S $B; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip link add pc netns "$B" type veth peer name eth0 netns "$C"
ip link add ps netns "$B" type veth peer name eth0 netns "$S"
for p in pc ps; do ip -n "$B" link set "$p" addrgenmode none; ip -n "$B" link set "$p" up; done
ip -n "$C" addr add 10.89.0.1/24 dev eth0; ip -n "$C" link set eth0 up
ip -n "$S" addr add 10.89.0.2/24 dev eth0; ip -n "$S" link set eth0 up
ins iperf3 -s -D -I "$WORK/iperf3.pid" >/dev/null
ins python3 "$HERE/cps.py" serve 10.89.0.2 9000 >"$WORK/cps-server.log" 2>&1 &
for ((i = 0; ; i++)); do
    [[ $(ins ss -Hltn '( sport = :5201 or sport = :9000 )' | wc -l) -ge 2 ]] && break
    ((i < 50)) || die "servers did not start: $(cat "$WORK/cps-server.log")"
    sleep 0.1
done

cat >"$WORK/brdivert.toml" <<TOML
rules = []
[bridge]
name = "ubr0"
ports = ["pc", "ps"]
datapath = "userspace"
address = ["10.89.0.254/24"]
TOML

# ---------------------------------------------------------------------------------------
# configurations

up_kernel() {
    ip -n "$B" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$B" link set pc master br0; ip -n "$B" link set ps master br0
    ip -n "$B" link set br0 up
}
down_kernel() { ip -n "$B" link del br0; }
up_user() { start_datapath "$BIN" "$WORK/brdivert.toml"; }
up_user2() { start_datapath "$BIN2" "$WORK/brdivert.toml"; }
down_user2() { down_user; }
up_loop() { start_datapath "$LOOP_BIN" pc ps; }
down_loop() { down_user; }
start_datapath() { # BINARY ARGS...
    # ip netns exec and env exec the binary, so $! is the datapath itself (not a subshell)
    ip netns exec "$B" env BRDIVERT_BATCH="${BRDIVERT_BATCH:-64}" BRDIVERT_STATE_DIR="$WORK/state" "$@" 2>"$WORK/dp.log" &
    DP_PID=$!
    for ((i = 0; ; i++)); do
        grep -q running "$WORK/dp.log" 2>/dev/null && break
        kill -0 "$DP_PID" 2>/dev/null && ((i < 50)) || die "userspace datapath did not start: $(grep -v '^ *[0-9]*: \|^ *at ' "$WORK/dp.log" | head -20)"
        sleep 0.1
    done
}
down_user() { kill -TERM "$DP_PID"; wait "$DP_PID" || true; DP_PID=""; }
up_ovs() { ovs_start "$OBR" pc ps; }
down_ovs() { ovs_stop; }

base_of() { echo "${1%-txoff}"; }
txoff_of() { [[ $1 == ovs || $1 == *-txoff ]]; }
set_txcsum() { # on|off, on both endpoints
    local n
    for n in $C $S; do ip netns exec "$n" ethtool -K eth0 tx "$1" >/dev/null 2>&1 || die "ethtool -K eth0 tx $1 failed in $n"; done
}
features() { # the endpoint features that matter here, as "tx-csum on, tso on"
    # (tx-tcp-segmentation, not ethtool's summary line: newer kernels have feature bits, such
    # as tx-tcp-accecn-segmentation, that keep an older ethtool's summary "on")
    inc ethtool -k eth0 | awk -F': ' '/^tx-checksumming:|^[[:space:]]*tx-tcp-segmentation:/ {
        sub(/ \[.*/, "", $2); printf "%s%s %s", (n++ ? ", " : ""), ($1 ~ /checksumming/ ? "tx-csum" : "tso"), $2 }'
}
up() {
    local c=$1
    if txoff_of "$c"; then set_txcsum off; else set_txcsum on; fi
    "up_$(base_of "$c")"
    UP=$c
    wait_path
    [[ -n ${FEAT[$c]:-} ]] || FEAT[$c]=$(features)
}
down() { "down_$(base_of "$UP")"; UP=""; }

wait_path() {
    for ((i = 0; i < 50; i++)); do
        inc ping -c1 -W1 10.89.0.2 >/dev/null 2>&1 && return 0
    done
    die "no path through the bridge in configuration $UP"
}

# ---------------------------------------------------------------------------------------
# measurements

HZ=$(getconf CLK_TCK) NCPU=$(nproc)
rx() { ins cat /sys/class/net/eth0/statistics/rx_packets; }
# Idle + iowait of all CPUs (USER_HZ units). With NO_HZ the kernel measures these at idle
# entry and exit (get_cpu_idle_time_us), so they are exact; the busy fields (user, system,
# softirq, ...) are only sampled at the tick (no VIRT_CPU_/IRQ_TIME_ACCOUNTING here), which
# misses most of a light, bursty load. Busy = wall time x CPUs - idle.
sys_idle() { awk '/^cpu / { print $5 + $6 }' /proc/stat; }
dp_pid() {
    case $(base_of "$UP") in
        user | user2 | loop) echo "$DP_PID" ;;
        ovs) echo "$OVS_VSWITCHD_PID" ;;
        *) echo "" ;;
    esac
}
proc_cpu() { # run time of the datapath process, all threads, in ns (schedstat: exact); - if none
    local pid
    pid=$(dp_pid)
    if [[ -n $pid && -d /proc/$pid/task ]]; then
        cat /proc/"$pid"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'
    else
        echo -
    fi
}

tcp() { inc iperf3 -c 10.89.0.2 -t "$SECS" -J | python3 "$LIB" tcp; }
udp() {
    local a b
    a=$(rx)
    inc iperf3 -c 10.89.0.2 -u -l 18 -b 0 -t "$SECS" >/dev/null
    b=$(rx)
    echo $(((b - a) / SECS))
}
cps() { inc python3 "$HERE/cps.py" connect 10.89.0.2 9000 "$SECS" | python3 "$LIB" cps; }
# CPU at a fixed load: prints "idle_jiffies dp_ns t0 t1 frames_received" and leaves the
# iperf3 JSON in $WORK/cpu.json; the caller turns it into per-packet figures.
cpu_run() {
    local i0 i1 p0 p1 t0 t1 r0 r1
    p0=$(proc_cpu) r0=$(rx) i0=$(sys_idle) t0=$EPOCHREALTIME
    inc iperf3 -c 10.89.0.2 -t "$SECS" -J "$@" >"$WORK/cpu.json"
    i1=$(sys_idle) t1=$EPOCHREALTIME r1=$(rx) p1=$(proc_cpu)
    local dp=-
    [[ $p0 == - || $p1 == - ]] || dp=$((p1 - p0))
    echo "$((i1 - i0)) $dp $t0 $t1 $((r1 - r0))"
}
cpu_udp() { # ns/frame, datapath-process ns/frame, frames/s received, machine busy %
    local m
    m=$(cpu_run -u -l 18 -b $((CPU_PPS * 18 * 8)))
    python3 "$LIB" cpu udp "$HZ" "$NCPU" "$SECS" $m <"$WORK/cpu.json"
}
cpu_tcp() { # ns per 1448 B received, datapath-process ns per 1448 B, Mbit/s received, busy %
    local m
    m=$(cpu_run -b "${CPU_MBIT}M")
    python3 "$LIB" cpu tcp "$HZ" "$NCPU" "$SECS" $m <"$WORK/cpu.json"
}
idle_busy() { # busy % of the machine over 2 s with no traffic (background)
    local i0 i1 t0 t1
    i0=$(sys_idle) t0=$EPOCHREALTIME; sleep 2; i1=$(sys_idle) t1=$EPOCHREALTIME
    awk -v i="$((i1 - i0))" -v t0="$t0" -v t1="$t1" -v hz="$HZ" -v n="$NCPU" \
        'BEGIN { b = 100 * (1 - i / hz / ((t1 - t0) * n)); printf "%.1f\n", (b < 0 ? 0 : b) }'
}

# ---------------------------------------------------------------------------------------
# rounds, interleaved

declare -A FEAT
SAMPLES=$WORK/samples.tsv
: >"$SAMPLES"
# Warm-up (ARP, page cache of the tools), not recorded.
up kernel
inc iperf3 -c 10.89.0.2 -t 1 >/dev/null
down
NCFG=${#CONFIGS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    bg=$(idle_busy)
    echo "$r - idle_busy $bg" >>"$SAMPLES"
    log "round $r: idle machine ${bg}% busy"
    for ((k = 0; k < NCFG; k++)); do
        c=${CONFIGS[$(((k + r - 1) % NCFG))]}   # rotate the order every round
        up "$c"
        sleep 0.5
        line="round $r $c:"
        if wants tcp; then
            t=$(tcp); sleep 0.3
            echo "$r $c tcp $t" >>"$SAMPLES"; line+=" tcp $t Gbit/s"
        fi
        if wants udp; then
            u=$(udp); sleep 0.3
            echo "$r $c udp $u" >>"$SAMPLES"; line+=", udp64 $u frames/s"
        fi
        if wants cps; then
            n=$(cps); sleep 0.3
            echo "$r $c cps $n" >>"$SAMPLES"; line+=", $n conn/s"
        fi
        if wants cpu_udp; then
            read -r ns dpns rate busy sent < <(cpu_udp); sleep 0.3
            for m in "cpu_udp $ns" "cpu_udp_dp $dpns" "cpu_udp_rate $rate" "cpu_udp_sent $sent" "cpu_udp_busy $busy"; do
                echo "$r $c $m" >>"$SAMPLES"
            done
            line+=", cpu ${ns} ns/frame at ${rate} frames/s (sent ${sent}; ${busy}% busy)"
        fi
        if wants cpu_tcp; then
            read -r ns dpns rate busy sent < <(cpu_tcp); sleep 0.3
            for m in "cpu_tcp $ns" "cpu_tcp_dp $dpns" "cpu_tcp_rate $rate" "cpu_tcp_sent $sent" "cpu_tcp_busy $busy"; do
                echo "$r $c $m" >>"$SAMPLES"
            done
            line+=", cpu ${ns} ns/1448 B at ${rate} Mbit/s (sent ${sent}; ${busy}% busy)"
        fi
        down
        log "$line"
    done
done
set_txcsum on

# ---------------------------------------------------------------------------------------
# report

if [[ -z $OUT ]]; then
    mkdir -p "$HERE/results"
    OUT=$HERE/results/userspace-$(date +%F).md
    [[ -e $OUT ]] && OUT=$HERE/results/userspace-$(date +%F-%H%M).md
fi
feat_json=$(for c in "${CONFIGS[@]}"; do printf '%s\t%s\n' "$c" "${FEAT[$c]:-?}"; done |
    python3 -c 'import json,sys; print(json.dumps(dict(l.rstrip("\n").split("\t", 1) for l in sys.stdin)))')
export CMDLINE ROUNDS SECS ONLY CPU_PPS CPU_MBIT HZ NCPU FEAT_JSON=$feat_json DATE_UTC=$(date -u +%FT%TZ)
export CONFIGS_LIST="${CONFIGS[*]}"
export MACHINE="$NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r), cpuidle $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo '?')$([[ -r $HALT_POLL_PARAM ]] && echo " (guest_halt_poll_ns $(cat "$HALT_POLL_PARAM"))")"
export TOOLS="$(iperf3 --version | head -1 | cut -d' ' -f1-2), $(ip -V), $(python3 --version)$(has_config ovs && echo ", $(ovs-vswitchd --version | head -1)")"
export BRDIVERT="$(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo '?')$([[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]] && echo ' (work tree modified)')"
export BATCH="${BRDIVERT_BATCH:-64}"
python3 "$LIB" summary "$SAMPLES" "$OUT"
log "report: $OUT"
cat "$OUT"
