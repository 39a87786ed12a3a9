#!/usr/bin/env bash
# bench/queue.sh — cost of `decide = "queue"` rules (issue 3): new-connection rate and bulk
# TCP throughput through brdivert's kernel datapath with NFQUEUE decisions, against the same
# rules decided in the kernel alone and against a bare bridge, plus the daemon's own verdict
# latency histogram.
#
# Three throw-away network namespaces, client -- bridge host -- server, joined by two veth
# pairs that are ports of one kernel bridge (created by this script) in the bridge host:
#
#   [client ns] eth0 10.89.0.1 ==veth== pc [bridge ns: bridge 10.89.0.254/24, VIP 10.89.1.100 on lo] ps ==veth== eth0 10.89.0.2 [server ns]
#
# The client routes the VIP via the server's address, so VIP frames carry the server's MAC
# and reach the bridge host only if brdivert diverts them (the server does not own the VIP).
#
# Configurations, interleaved (order rotated every round):
#   bare     bare kernel bridge: no brdivert, `nft flush ruleset`, br_netfilter off
#   noqueue  `brdivert apply` of the two rules below WITHOUT decide = "queue" (kernel only);
#            the static equivalent of the daemon's allow list is `except_dst = [server]`
#   queue    `brdivert run` with the two rules WITH decide = "queue" (br_netfilter on for the
#            bridge, NFQUEUE through the xt target or native queue, whichever the probe picks),
#            and `brdivert allow add <server>`; the daemon is started fresh for every round, so
#            its counters and latency histogram cover that round only
#   bare2    (with --aa) a second bare bridge: the run's own noise (A/A)
#
# Rules (queue form; noqueue drops `decide` and exempts the server instead of allow-listing it):
#   "vip"       tcp dport 9000, dst VIP, action local            -> the daemon answers DIVERT:
#               the connection is served by a cps.py server on the bridge host (a local VIP,
#               no proxy in the path, so this is the queue round trip + the divert, nothing else)
#   "bypassed"  tcp dport {9000, 5201}, dst server, action local -> the server is on the allow
#               list, so the daemon answers BYPASS: the flow still pays the queue round trip for
#               its first packet, then is bridged to the server (and its ct mark restored on
#               every later packet)
#
# Metrics per round and configuration:
#   tcp       iperf3 bulk TCP to the server (queue: a flow the decider bypassed; its two
#             connections, control and data, are queued once each)
#   cps       connections/s to the server (bench/cps.py; queue: every connection queued, bypassed)
#   cps_vip   connections/s to the VIP (noqueue and queue only; queue: every connection queued,
#             diverted); its ratio is taken against the bare bridge's `cps` of the same round,
#             and, to isolate the queue, against noqueue's cps_vip of the same round
#   latency   queue only: verdict latency p50/p99 (bucket upper bounds) and the decision
#             counters from `brdivert status --json` at the end of the round
#
# Targets from the issue: tcp >= 0.95x bare, connections/s >= 0.8x bare.
#
# Usage: bench/queue.sh [--quick] [--aa] [--pairs N] [--secs S] [--brdivert PATH] [--out FILE]
#   defaults: 5 rounds, 5 s runs (about 5 minutes; 6 with --aa)
#   --quick        smoke test: 2 rounds, 1 s runs (checks the setup, measures nothing useful)
#   --aa           add a second bare-bridge configuration (A/A noise check)
#   --brdivert P   binary to use (default: $BRDIVERT, else $CARGO_TARGET_DIR/release/brdivert,
#                  else target/release/brdivert, else brdivert on PATH; build with --release)
#   --out FILE     report path (default bench/results/queue-<date>[-quick].md)
# Needs root, iperf3, nft, iproute2, python3, taskset, ss; conntrack (optional: flushes the
# bridge ns's conntrack table between runs). Traffic stays inside its namespaces.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LIB="$HERE/queue_lib.py"
CMDLINE="bench/queue.sh${*:+ $*}"

PAIRS=5 SECS=5 QUICK=0 AA=0 OUT="" BRDIVERT="${BRDIVERT:-}"
while (($#)); do
    case "$1" in
        --quick) QUICK=1 PAIRS=2 SECS=1 ;;
        --aa) AA=1 ;;
        --pairs) PAIRS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --brdivert) BRDIVERT=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "queue.sh: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $EUID -eq 0 ]] || die "needs root (network namespaces, nft, NFQUEUE)"
for t in iperf3 nft ip python3 taskset ss; do
    command -v "$t" >/dev/null || die "missing $t"
done
if [[ -z $BRDIVERT ]]; then
    for c in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/brdivert"} "$REPO/target/release/brdivert"; do
        if [[ -x $c ]]; then BRDIVERT=$c; break; fi
    done
    [[ -n $BRDIVERT ]] || BRDIVERT=$(command -v brdivert || true)
fi
[[ -x $BRDIVERT ]] || die "no brdivert binary (build with cargo build --release, or --brdivert PATH)"
BRDIVERT=$(realpath "$BRDIVERT")
HAVE_CONNTRACK=0
command -v conntrack >/dev/null && HAVE_CONNTRACK=1

# ---------------------------------------------------------------------------------------
# names (unique per run) and cleanup

ID="bdq$$"
NSC="$ID-cli" NSB="$ID-br" NSS="$ID-srv"
BR="${ID}br"                         # bridge device inside the bridge ns (<= 15 chars)
SRV=10.89.0.2 CLI=10.89.0.1 BRADDR=10.89.0.254/24 VIP=10.89.1.100
IPERF_PORT=5201 CPS_PORT=9000
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
STATE=none          # none | applied | running
DAEMON_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $DAEMON_PID ]]; then kill "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; fi
    if [[ $STATE != none ]]; then
        ip netns exec "$NSB" env BRDIVERT_STATE_DIR="$WORK/state" \
            "$BRDIVERT" flush -c "$WORK/settings-queue.toml" >/dev/null 2>&1
    fi
    topology_stop_processes
    topology_down
    if ((rc != 0)) && [[ -f $WORK/daemon.log ]]; then
        echo "--- last lines of the daemon's log:" >&2
        tail -20 "$WORK/daemon.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

source "$HERE/topology.sh"   # inb/inc/ins, topology_up/_stop_processes/_down

# ---------------------------------------------------------------------------------------
# topology

# br_netfilter: topology_up turns the namespace sysctls off (as brdivert leaves them); the
# queue configuration turns on the bridge's own nf_call_iptables/ip6tables, and flush turns
# them back off.
topology_up
ip -n "$NSB" addr add "$VIP/32" dev lo
ip -n "$NSC" route add "$VIP/32" via "$SRV"
bridge_nf() { # the bridge's own nf_call_iptables (0/1)
    inb ip -d -j link show "$BR" | python3 -c \
        'import json,sys; print(json.load(sys.stdin)[0]["linkinfo"]["info_data"].get("nf_call_iptables", "?"))'
}


# Servers pinned to CPU 1; clients run on CPU 0. The VIP's server runs on the bridge host.
ins taskset -c 1 iperf3 -s -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
ins taskset -c 1 python3 "$HERE/cps.py" serve "$SRV" "$CPS_PORT" >"$WORK/cps-server.log" 2>&1 &
inb taskset -c 1 python3 "$HERE/cps.py" serve "$VIP" "$CPS_PORT" >"$WORK/cps-vip.log" 2>&1 &
for i in $(seq 1 50); do
    n=$(ins ss -Hltn "( sport = :$IPERF_PORT or sport = :$CPS_PORT )" | wc -l)
    m=$(inb ss -Hltn "( sport = :$CPS_PORT )" | wc -l)
    ((n >= 2 && m >= 1)) && break
    ((i < 50)) || die "servers did not start: $(cat "$WORK"/*.log)"
    sleep 0.1
done

# ---------------------------------------------------------------------------------------
# brdivert settings and rules

mkdir -p "$WORK/state"
cat >"$WORK/rules-queue.toml" <<EOF
# Generated by bench/queue.sh.
[[divert]]
name   = "vip"
proto  = "tcp"
dport  = $CPS_PORT
dst    = "$VIP"
action = "local"
decide = "queue"

[[divert]]
name   = "bypassed"
proto  = "tcp"
dport  = [$CPS_PORT, $IPERF_PORT]
dst    = "$SRV"
action = "local"
decide = "queue"
EOF
cat >"$WORK/rules-noqueue.toml" <<EOF
# Generated by bench/queue.sh: the queue rules decided in the kernel alone; the exemption
# stands for the daemon's allow list.
[[divert]]
name   = "vip"
proto  = "tcp"
dport  = $CPS_PORT
dst    = "$VIP"
action = "local"

[[divert]]
name   = "bypassed"
proto  = "tcp"
dport  = [$CPS_PORT, $IPERF_PORT]
dst    = "$SRV"
except_dst = "$SRV"
action = "local"
EOF
for c in queue noqueue; do
    cat >"$WORK/settings-$c.toml" <<EOF
# Generated by bench/queue.sh: names the bridge the script created, so brdivert reuses it.
rules = ["rules-$c.toml"]

[bridge]
name     = "$BR"
ports    = ["pc", "ps"]
datapath = "kernel"
address  = ["$BRADDR"]

[control]
socket = "$WORK/control.sock"

[metrics]
listen = "127.0.0.1:9477"

[daemon]
watch = false
EOF
done

bd() { # brdivert in the bridge ns, state kept in the work dir
    inb env BRDIVERT_STATE_DIR="$WORK/state" "$BRDIVERT" "$@"
}
ctl() { "$BRDIVERT" "$@" --socket "$WORK/control.sock"; }

bd check -c "$WORK/settings-queue.toml" >"$WORK/check-queue.txt" 2>&1 ||
    die "brdivert check refused the queue settings: $(cat "$WORK/check-queue.txt")"
QUEUE_FORM=$(grep -m1 '^queue:' "$WORK/check-queue.txt" || echo "queue: ?")

stop_daemon() {
    [[ -n $DAEMON_PID ]] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
}

flush_ct() {
    if ((HAVE_CONNTRACK)); then inb conntrack -F >/dev/null 2>&1 || true; fi
}

set_config() {
    stop_daemon
    if [[ $STATE != none ]]; then
        bd flush -c "$WORK/settings-queue.toml" >"$WORK/last-flush.log" 2>&1 ||
            die "brdivert flush failed: $(cat "$WORK/last-flush.log")"
        STATE=none
    fi
    inb nft flush ruleset
    flush_ct
    case "$1" in
        bare|bare2) ;;
        noqueue)
            bd apply -c "$WORK/settings-noqueue.toml" >"$WORK/last-apply.log" 2>&1 ||
                die "brdivert apply (noqueue) failed: $(cat "$WORK/last-apply.log")"
            STATE=applied
            ;;
        queue)
            # Not through the inb function: $! must be the daemon itself (ip netns exec and
            # env exec it), not a subshell, so that stop_daemon signals the daemon.
            ip netns exec "$NSB" env BRDIVERT_STATE_DIR="$WORK/state" BRDIVERT_LOG=info \
                "$BRDIVERT" run -c "$WORK/settings-queue.toml" >>"$WORK/daemon.log" 2>&1 &
            DAEMON_PID=$!
            STATE=running
            for i in $(seq 1 100); do
                ctl status >/dev/null 2>&1 && break
                kill -0 "$DAEMON_PID" 2>/dev/null || die "brdivert run exited: $(tail -5 "$WORK/daemon.log")"
                ((i < 100)) || die "brdivert run did not answer status within 10 s"
                sleep 0.1
            done
            ctl allow add "$SRV" >/dev/null || die "brdivert allow add $SRV failed"
            ;;
    esac
    local want=0
    [[ $1 == queue ]] && want=1
    [[ $(bridge_nf) == "$want" ]] || die "bridge nf_call_iptables is $(bridge_nf) in config $1, expected $want"
}

# ---------------------------------------------------------------------------------------
# measurements (client pinned to CPU 0)

measure_tcp() {
    inc taskset -c 0 iperf3 -c "$SRV" -p "$IPERF_PORT" -t "$SECS" -J 2>/dev/null |
        python3 "$HERE/kernel_lib.py" tcp
}
measure_cps() { # HOST -> "cps conns errors"
    inc taskset -c 0 python3 "$HERE/cps.py" connect "$1" "$CPS_PORT" "$SECS" |
        python3 "$LIB" cps
}
queue_status() { # -> "packets divert bypass drop errors queue_drops p50_us p99_us count"
    ctl status --json | python3 "$LIB" status
}

# The divert and the bypass really happen (one connection each, before any round).
sanity() {
    set_config queue
    inc python3 "$HERE/cps.py" connect "$VIP" "$CPS_PORT" 0.01 | python3 "$LIB" cps >"$WORK/s1"
    inc python3 "$HERE/cps.py" connect "$SRV" "$CPS_PORT" 0.01 | python3 "$LIB" cps >"$WORK/s2"
    read -r _ c1 e1 <"$WORK/s1"
    read -r _ c2 e2 <"$WORK/s2"
    read -r pk dv bp _ <<<"$(queue_status)"
    ((c1 > 0 && e1 == 0 && c2 > 0 && e2 == 0)) ||
        die "sanity: connections failed (vip: $c1 ok $e1 errors; server: $c2 ok $e2 errors)"
    ((dv >= c1 && bp >= c2 && pk == dv + bp)) ||
        die "sanity: daemon counters do not match (packets $pk divert $dv bypass $bp for $c1 VIP + $c2 server connections)"
    log "sanity: $c1 VIP connections diverted and $c2 server connections bypassed, each queued once ($pk packets)"
}

CONFIGS=(bare noqueue queue)
if ((AA)); then CONFIGS+=(bare2); fi
NCFG=${#CONFIGS[@]}

SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
sanity
log "configs: ${CONFIGS[*]}; $PAIRS rounds x ${SECS}s runs; $QUEUE_FORM"
# Warm-up (ARP, caches, page cache of the tools); not recorded.
set_config bare
SECS_SAVE=$SECS SECS=1
measure_tcp >/dev/null; measure_cps "$SRV" >/dev/null
SECS=$SECS_SAVE
for ((r = 1; r <= PAIRS; r++)); do
    for ((k = 0; k < NCFG; k++)); do
        cfg=${CONFIGS[$(((k + r - 1) % NCFG))]}   # rotate the order every round
        set_config "$cfg"
        sleep 0.5
        line="round $r $cfg:"
        tcp=$(measure_tcp); sleep 0.3
        echo "$r $cfg tcp $tcp" >>"$SAMPLES"
        line+=" tcp $(printf %.2f "$tcp") Gbit/s"
        flush_ct
        read -r cps conns errs < <(measure_cps "$SRV")
        printf '%s %s cps %s\n%s %s cps_errors %s\n' "$r" "$cfg" "$cps" "$r" "$cfg" "$errs" >>"$SAMPLES"
        line+=" cps $cps ($errs errors)"
        total_vip=0
        if [[ $cfg == noqueue || $cfg == queue ]]; then
            flush_ct
            read -r vcps vconns verrs < <(measure_cps "$VIP")
            printf '%s %s cps_vip %s\n%s %s cps_vip_errors %s\n' "$r" "$cfg" "$vcps" "$r" "$cfg" "$verrs" >>"$SAMPLES"
            line+=" cps_vip $vcps ($verrs errors)"
            total_vip=$vconns
        fi
        if [[ $cfg == queue ]]; then
            read -r pk dv bp dr qe qd p50 p99 n < <(queue_status)
            printf '%s queue %s %s\n' \
                "$r" q_packets "$pk" "$r" q_divert "$dv" "$r" q_bypass "$bp" "$r" q_drop "$dr" \
                "$r" q_errors "$qe" "$r" q_queue_drops "$qd" "$r" q_p50_us "$p50" \
                "$r" q_p99_us "$p99" "$r" q_latency_count "$n" \
                "$r" q_expected_divert "$total_vip" "$r" q_expected_bypass "$((conns + 2))" \
                >>"$SAMPLES"
            line+=" | queued $pk (divert $dv bypass $bp drop $dr errors $qe queue drops $qd) verdict p50 ${p50}us p99 ${p99}us"
        fi
        log "$line"
    done
done
set_config bare

# ---------------------------------------------------------------------------------------
# report

DATE=$(date +%F)
if [[ -z $OUT ]]; then
    mkdir -p "$HERE/results"
    suffix=""
    if ((QUICK)); then suffix=-quick; fi
    OUT="$HERE/results/queue-$DATE$suffix.md"
fi
export DATE CMDLINE PAIRS SECS QUEUE_FORM HAVE_CONNTRACK QUICK
export BRDESC="$BRDIVERT ($(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo '?'))"
export MACHINE="$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r)"
export TOOLS="$(iperf3 --version | head -1 | cut -d' ' -f1-2), $(nft --version), $(python3 --version)"
export CONFIGS_LIST="${CONFIGS[*]}"
python3 "$LIB" summary "$SAMPLES" "$OUT"
log "report: $OUT"
cat "$OUT"
