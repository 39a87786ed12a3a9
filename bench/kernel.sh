#!/usr/bin/env bash
# bench/kernel.sh — cost of brdivert's kernel datapath on bridged traffic (issue 2).
#
# Builds three throw-away network namespaces, client -- bridge host -- server, joined by two
# veth pairs that are ports of one kernel bridge in the bridge host:
#
#   [client ns] eth0 10.88.0.1 ==veth== pc [bridge ns: bridge 10.88.0.254/24] ps ==veth== eth0 10.88.0.2 [server ns]
#
# and measures, interleaved in one run (config order rotated every round), per config:
#   bare  bare kernel bridge: no brdivert, `nft flush ruleset` in the bridge ns
#   one   (a) `brdivert apply` of one rule: tcp dport 80 redirect (the traffic under test is
#         not port 80, so it is only the cost of brdivert's rules on bridged traffic)
#   vips  (b) `brdivert apply` of one proto-less `local` rule with 10,000 scattered VIP /32s
#         in dst and 100 except_src entries (generated); every IPv4 frame jumps into the rule
#         chain and misses both set lookups, so it is bridged (the worst case per frame)
#   bare2 (only with --aa) a second bare bridge, to show the run's own noise (A/A)
#   nft1  (only with --floor) no brdivert: one hand-written nft bridge rule of the shape of
#         (a)'s (prerouting, VLAN check, tcp dport 80, counter): the cost of any nft rule on
#         the bridge hook, the floor for a ruleset-based datapath
# Metrics: TCP throughput (iperf3), UDP 64-byte frames/s received at the server's interface
# (iperf3 -u -l 64 -b 0; iperf3's own socket-level count is kept for reference), TCP
# connections/s (bench/cps.py), and the apply time of the 10k-VIP policy (`brdivert apply`
# over netlink vs `nft -f` of `brdivert render`, both into an empty ruleset).
#
# The bridge is created by this script (same device, same veths in every configuration) and
# brdivert's settings name it: `brdivert apply` finds it, reuses it (it reports "existing")
# and records nothing to undo for it, so `brdivert flush` removes only brdivert's tables.
# br_netfilter's bridge-nf-call-ip{,6}tables are set to 0 in the bridge ns for ALL
# configurations (brdivert turns them off anyway), so the bare baseline is fair.
#
# Usage: bench/kernel.sh [--quick] [--aa] [--floor] [--pairs N] [--secs S] [--apply-reps N]
#                        [--only LIST] [--brdivert PATH] [--no-brdivert] [--out FILE]
#   defaults: 7 rounds, 5 s runs, 7 apply repetitions (about 7 minutes; 9 with --aa)
#   --quick        smoke test: 2 rounds, 2 s runs, 3 apply repetitions
#   --aa           add a second bare-bridge configuration (A/A noise check)
#   --floor        add the nft1 configuration (one plain nft rule, see above)
#   --only LIST    measure only these of tcp,udp,cps,apply (comma-separated; investigations)
#   --no-brdivert  only bare bridges (bare + bare2): debug the topology and measurement
#   --brdivert P   binary to use (default: $BRDIVERT, else $CARGO_TARGET_DIR/release/brdivert,
#                  else target/release/brdivert, else brdivert on PATH; build with --release)
#   --out FILE     report path (default bench/results/kernel-<date>[-quick].md)
# Needs root, iperf3, nft, iproute2, python3, taskset. Traffic stays inside its namespaces.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LIB="$HERE/kernel_lib.py"
CMDLINE="bench/kernel.sh${*:+ $*}"

PAIRS=7 SECS=5 APPLY_REPS=7 ONLY=tcp,udp,cps,apply QUICK=0 AA=0 FLOOR=0 USE_BRDIVERT=1 OUT="" BRDIVERT="${BRDIVERT:-}"
while (($#)); do
    case "$1" in
        --quick) QUICK=1 PAIRS=2 SECS=2 APPLY_REPS=3 ;;
        --aa) AA=1 ;;
        --floor) FLOOR=1 ;;
        --no-brdivert) USE_BRDIVERT=0 AA=1 ;;
        --only) ONLY=$2; shift ;;
        --pairs) PAIRS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --apply-reps) APPLY_REPS=$2; shift ;;
        --brdivert) BRDIVERT=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "kernel.sh: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $EUID -eq 0 ]] || die "needs root (network namespaces, nft)"
for t in iperf3 nft ip python3 taskset ss; do
    command -v "$t" >/dev/null || die "missing $t"
done
if ((USE_BRDIVERT)); then
    if [[ -z $BRDIVERT ]]; then
        for c in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/brdivert"} "$REPO/target/release/brdivert"; do
            if [[ -x $c ]]; then BRDIVERT=$c; break; fi
        done
        [[ -n $BRDIVERT ]] || BRDIVERT=$(command -v brdivert || true)
    fi
    [[ -x $BRDIVERT ]] || die "no brdivert binary (build with cargo build --release, or --brdivert PATH)"
    BRDIVERT=$(realpath "$BRDIVERT")
fi

# ---------------------------------------------------------------------------------------
# names (unique per run) and cleanup

ID="bdk$$"
NSC="$ID-cli" NSB="$ID-br" NSS="$ID-srv"
BR="${ID}br"                         # bridge device inside the bridge ns (<= 15 chars)
SRV=10.88.0.2 CLI=10.88.0.1 BRADDR=10.88.0.254/24
IPERF_PORT=5201 CPS_PORT=9000
WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
APPLIED=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((APPLIED)); then
        ip netns exec "$NSB" env BRDIVERT_STATE_DIR="$WORK/state" \
            "$BRDIVERT" flush -c "$WORK/settings-vips.toml" >/dev/null 2>&1
    fi
    topology_stop_processes
    topology_down
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

source "$HERE/topology.sh"   # inb/inc/ins, topology_up/_stop_processes/_down

# ---------------------------------------------------------------------------------------
# topology

topology_up
BRNF=$(inb sh -c 'cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo "absent"')


# Servers, pinned to CPU 1; clients run on CPU 0.
ins taskset -c 1 iperf3 -s -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
ins taskset -c 1 python3 "$HERE/cps.py" serve "$SRV" "$CPS_PORT" >"$WORK/cps-server.log" 2>&1 &
for i in $(seq 1 50); do
    n=$(ins ss -Hltn "( sport = :$IPERF_PORT or sport = :$CPS_PORT )" | wc -l)
    ((n >= 2)) && break
    ((i < 50)) || die "servers did not start: $(cat "$WORK"/*-server.log)"
    sleep 0.1
done

# ---------------------------------------------------------------------------------------
# brdivert settings and rules

write_settings() { # NAME RULEFILE
    cat >"$WORK/settings-$1.toml" <<EOF
# Generated by bench/kernel.sh: names the bridge the script created, so apply reuses it.
rules = ["$2"]

[bridge]
name     = "$BR"
ports    = ["pc", "ps"]
datapath = "kernel"
address  = ["$BRADDR"]

[control]
socket = "$WORK/control.sock"
EOF
}

if ((USE_BRDIVERT)); then
    mkdir -p "$WORK/state"
    cat >"$WORK/rules-one.toml" <<'EOF'
[[divert]]
name   = "web"
proto  = "tcp"
dport  = 80
action = "redirect"
port   = 3129
EOF
    python3 "$LIB" gen-vips "$WORK/rules-vips.toml" 10000 100
    write_settings one rules-one.toml
    write_settings vips rules-vips.toml
fi

bd() { # brdivert in the bridge ns, state kept in the work dir
    inb env BRDIVERT_STATE_DIR="$WORK/state" "$BRDIVERT" "$@"
}

set_config() {
    case "$1" in
        bare|bare2)
            if ((APPLIED)); then
                bd flush -c "$WORK/settings-vips.toml" >"$WORK/last-flush.log" 2>&1 ||
                    die "brdivert flush failed: $(cat "$WORK/last-flush.log")"
                APPLIED=0
            fi
            inb nft flush ruleset
            ;;
        nft1)
            if ((APPLIED)); then
                bd flush -c "$WORK/settings-vips.toml" >"$WORK/last-flush.log" 2>&1 ||
                    die "brdivert flush failed: $(cat "$WORK/last-flush.log")"
                APPLIED=0
            fi
            inb nft flush ruleset
            inb nft -f - <<'NFT'
table bridge floor {
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ether type != 8021q ether type != 8021ad meta l4proto tcp tcp dport 80 counter
    }
}
NFT
            ;;
        one|vips)
            # From a flushed brdivert (no pin record left by the other configuration), so each
            # policy is measured as it runs, not in the hours after a reload that changed
            # which frames the rules select (then every frame meets the pin lookup too:
            # docs/architecture.md section 5).
            if ((APPLIED)); then
                bd flush -c "$WORK/settings-vips.toml" >"$WORK/last-flush.log" 2>&1 ||
                    die "brdivert flush failed: $(cat "$WORK/last-flush.log")"
            fi
            inb nft flush ruleset
            bd apply -c "$WORK/settings-$1.toml" >"$WORK/last-apply.log" 2>&1 ||
                die "brdivert apply ($1) failed: $(cat "$WORK/last-apply.log")"
            APPLIED=1
            [[ $(inb nft list tables) == *"table bridge brdivert"* ]] ||
                die "after apply ($1) there is no bridge brdivert table"
            ;;
    esac
    # br_netfilter must stay off in every configuration.
    [[ $(inb sh -c 'cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo absent') != 1 ]] ||
        die "bridge-nf-call-iptables is on in config $1"
}

# ---------------------------------------------------------------------------------------
# measurements (client pinned to CPU 0)

measure_tcp() {
    inc taskset -c 0 iperf3 -c "$SRV" -p "$IPERF_PORT" -t "$SECS" -J 2>/dev/null |
        python3 "$LIB" tcp
}
rx_packets() { ins cat /sys/class/net/eth0/statistics/rx_packets; }
measure_udp() { # prints "frames/s at the server's interface" "datagrams/s read by iperf3"
    local rx0 rx1
    rx0=$(rx_packets)
    inc taskset -c 0 iperf3 -c "$SRV" -p "$IPERF_PORT" -u -l 64 -b 0 -t "$SECS" -J \
        >"$WORK/udp.json" 2>/dev/null || true
    rx1=$(rx_packets)
    python3 "$LIB" udp $((rx1 - rx0)) <"$WORK/udp.json"
}
measure_cps() {
    inc taskset -c 0 python3 "$HERE/cps.py" connect "$SRV" "$CPS_PORT" "$SECS" |
        python3 "$LIB" cps
}

if ((USE_BRDIVERT)); then CONFIGS=(bare one vips); else CONFIGS=(bare); fi
if ((AA)); then CONFIGS+=(bare2); fi
if ((FLOOR)); then CONFIGS+=(nft1); fi
NCFG=${#CONFIGS[@]}

# ---------------------------------------------------------------------------------------
# traffic rounds, interleaved

SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
log "configs: ${CONFIGS[*]}; $PAIRS rounds x ${SECS}s runs"
# Warm-up (ARP, caches, page cache of the tools); not recorded.
set_config bare
SECS_SAVE=$SECS SECS=1
measure_tcp >/dev/null; measure_udp >/dev/null; measure_cps >/dev/null
SECS=$SECS_SAVE
for ((r = 1; r <= PAIRS; r++)); do
    for ((k = 0; k < NCFG; k++)); do
        cfg=${CONFIGS[$(((k + r - 1) % NCFG))]}   # rotate the order every round
        set_config "$cfg"
        sleep 0.5
        line="round $r $cfg:"
        if [[ ,$ONLY, == *,tcp,* ]]; then
            tcp=$(measure_tcp); sleep 0.3
            echo "$r $cfg tcp $tcp" >>"$SAMPLES"
            line+=" tcp $(printf %.2f "$tcp") Gbit/s"
        fi
        if [[ ,$ONLY, == *,udp,* ]]; then
            read -r udp udp_app < <(measure_udp); sleep 0.3
            printf '%s %s udp %s\n%s %s udp_app %s\n' "$r" "$cfg" "$udp" "$r" "$cfg" "$udp_app" >>"$SAMPLES"
            line+=" udp $(printf %.0f "$udp") pps at eth0 ($(printf %.0f "$udp_app") read)"
        fi
        if [[ ,$ONLY, == *,cps,* ]]; then
            cps=$(measure_cps)
            echo "$r $cfg cps $cps" >>"$SAMPLES"
            line+=" cps $cps"
        fi
        log "$line"
    done
done
set_config bare

# ---------------------------------------------------------------------------------------
# apply time of the 10k-VIP policy, into an empty ruleset, interleaved

APPLY="$WORK/apply.tsv"
NFTSETS=""
if ((USE_BRDIVERT)) && [[ ,$ONLY, == *,apply,* ]]; then
    : >"$APPLY"
    # The render is taken while the bridge exists, so it carries the real bridge MAC.
    bd render -c "$WORK/settings-vips.toml" >"$WORK/vips.nft" 2>"$WORK/render.err" ||
        die "brdivert render failed: $(cat "$WORK/render.err")"
    # nft 1.0.6 cannot parse `meta broute set 1` (newer than it), which brdivert renders when
    # the kernel has it. Then load the frame diverter's form instead, the one brdivert itself
    # uses on kernels without broute (same rule count; the lookup sets are unchanged).
    NFT_SUBST=""
    if ! inb nft -c -f "$WORK/vips.nft" 2>"$WORK/nft-check.err"; then
        if grep -q 'meta broute set 1' "$WORK/vips.nft"; then
            mac=$(inb cat "/sys/class/net/$BR/address")
            sed -i "s/meta broute set 1/meta pkttype set host ether daddr set $mac/" "$WORK/vips.nft"
            NFT_SUBST="nft $(nft --version | cut -d' ' -f2) cannot parse 'meta broute set 1' from brdivert render, so the nft -f file has 'meta pkttype set host ether daddr set <bridge MAC>' in its place (one statement; the sets are identical)."
        fi
        # nft 1.0.6 also aborts on brdivert's flow-pinning statements (a dynamic map update
        # with a concatenated key and a value, which the kernel accepts over netlink): the
        # baseline file leaves those statements and the two pinned-flow rules out.
        if ! inb nft -c -f "$WORK/vips.nft" 2>/dev/null && grep -q 'update @flows' "$WORK/vips.nft"; then
            sed -i -e '/map @flows[46]\|map @tpreplies[46]/d' -e 's/ update @[a-z0-9]* { [^}]* }//g' "$WORK/vips.nft"
            NFT_SUBST="${NFT_SUBST:+$NFT_SUBST }nft $(nft --version | cut -d' ' -f2) aborts on brdivert's flow-pinning statements (dynamic map update with a concatenated key and a value), so the nft -f file leaves them and the two pinned-flow rules out (the sets and every other rule are identical)."
        fi
        inb nft -c -f "$WORK/vips.nft" 2>"$WORK/nft-check.err" ||
            die "nft -f cannot load brdivert render output: $(head -5 "$WORK/nft-check.err")"
    fi
    log "apply timing: $APPLY_REPS x (brdivert apply, nft -f, brdivert render); $(wc -l <"$WORK/vips.nft") lines of nft"
    # One shell inside the bridge ns does the timing ($EPOCHREALTIME, no fork for the clock),
    # so `ip netns exec` itself is in neither figure.
    inb env BRDIVERT_STATE_DIR="$WORK/state" bash -c '
        set -euo pipefail
        bin=$1 settings=$2 nftfile=$3 reps=$4
        us() { local s=${1/./}; echo $((10#$s)); }
        for ((i = 0; i < reps; i++)); do
            nft flush ruleset
            t0=$EPOCHREALTIME; "$bin" apply -c "$settings" >/dev/null; t1=$EPOCHREALTIME
            echo "brdivert_apply $(( $(us $t1) - $(us $t0) ))"
            nft flush ruleset
            t0=$EPOCHREALTIME; nft -f "$nftfile"; t1=$EPOCHREALTIME
            echo "nft_f $(( $(us $t1) - $(us $t0) ))"
            nft flush ruleset
            t0=$EPOCHREALTIME; "$bin" render -c "$settings" >/dev/null; t1=$EPOCHREALTIME
            echo "brdivert_render $(( $(us $t1) - $(us $t0) ))"
        done' _ "$BRDIVERT" "$WORK/settings-vips.toml" "$WORK/vips.nft" "$APPLY_REPS" |
        awk '{ printf "%s %.3f\n", $1, $2 / 1000 }' >>"$APPLY"
    # What got loaded (one more apply, checked, then flushed).
    bd apply -c "$WORK/settings-vips.toml" >/dev/null
    APPLIED=1
    NFTSETS=$(inb nft -j list ruleset | python3 "$LIB" nftsets | paste -sd ';' | sed 's/;/; /g')
    set_config bare
else
    APPLY=-
fi

# ---------------------------------------------------------------------------------------
# report

DATE=$(date +%F)
if [[ -z $OUT ]]; then
    mkdir -p "$HERE/results"
    suffix=""
    if ((QUICK)); then suffix=-quick; fi
    OUT="$HERE/results/kernel-$DATE$suffix.md"
fi
if ((USE_BRDIVERT)); then
    BRDESC="$BRDIVERT ($(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo '?'))"
else
    BRDESC="not used (--no-brdivert)"
fi
CFGNOTES="bare = kernel bridge, empty ruleset; (a) = one rule 'tcp dport 80 redirect' (traffic under test is not diverted); (b) = one proto-less 'local' rule, 10,000 scattered VIP /32s in dst + 100 except_src (traffic under test misses both sets and is bridged)"
((AA == 0)) || CFGNOTES+="; bare2 = a second bare bridge (A/A: the run's own noise)"
((FLOOR == 0)) || CFGNOTES+="; floor = no brdivert, one hand-written nft bridge rule shaped like (a)'s (ether type != 8021q ether type != 8021ad meta l4proto tcp tcp dport 80 counter): what any nft rule on the bridge hook costs"

export DATE CMDLINE BRDESC CFGNOTES PAIRS SECS ONLY NFTSETS BRNF NFT_SUBST=${NFT_SUBST:-}
export MACHINE="$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r)"
export TOOLS="$(iperf3 --version | head -1 | cut -d' ' -f1-2), $(nft --version), $(ip -V), $(python3 --version)"
export CONFIGS_JSON=$(printf '%s\n' "${CONFIGS[@]}" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
python3 - "$WORK/meta.json" <<'EOF'
import json, os, sys
e = os.environ
notes = [
    "Topology: three network namespaces, veth pairs, one kernel bridge (STP off) created by "
    "the script; brdivert's settings name that bridge, so apply reuses it and flush removes "
    "only brdivert's tables. The same bridge and veths carry every configuration.",
    f"br_netfilter: bridge-nf-call-iptables/ip6tables set to 0 in the bridge ns for every "
    f"configuration (value seen: {e['BRNF']}).",
    "Pinning: servers (iperf3 -s, cps.py serve) on CPU 1, clients on CPU 0. With veth, the "
    "bridge and the receiver's softirq work run on the sender's CPU.",
    "TCP throughput: iperf3 -t SECS, one stream, receiver's bit rate. UDP: iperf3 -u -l 64 "
    "-b 0 (unlimited send rate); the UDP figure is the frames/s that reached the receiver's "
    "interface (its RX counter over iperf3's sending time), i.e. what the bridge forwarded. "
    "The sender, the bridge and the receiver's softirq share CPU 0, so a per-frame cost of "
    "the rules lowers it. The datagrams/s that iperf3 itself read are shown for reference "
    "only: when the machine is busy the one-threaded iperf3 receiver caps them (the rest is "
    "dropped at its socket buffer, UdpRcvbufErrors) and they stop depending on the bridge; "
    "in a quiet run the two figures are nearly equal.",
    "Connections/s: bench/cps.py, one Python client process in a bounded loop (connect, wait "
    "for the server's FIN, close) against a one-process Python accept-and-close server; the "
    "server closes first so TIME_WAIT does not exhaust the client's ports. Python's own cost "
    "dominates the absolute number; the ratio shows the per-connection cost the rules add.",
    "Apply time: timed inside the bridge ns with bash $EPOCHREALTIME (ip netns exec not "
    "included). `brdivert apply` is the whole process: start-up, settings + rule-file parse "
    "and validation (10,000 + 100 addresses), kernel probe, rtnetlink checks of the existing "
    "bridge/ports/address/sysctls, compile, and the netlink transaction. `nft -f` is the whole "
    "nft process loading the pre-rendered file (parse + netlink transaction); the render is "
    "not timed in it. Each starts from `nft flush ruleset`.",
    "Noise: on this 2-core VM single runs vary by about +-15%; rounds interleave the "
    "configurations (order rotated) and the ratio is the median of per-round ratios, "
    "which cancels slow drift but not short bursts. Use --aa for an A/A check. The bare "
    "bridge's 64 B UDP rate is bimodal on a 2-vCPU VM (sender, bridge and receiver softirq "
    "share CPU 0), so compare UDP ratios with the A/A column and the pooled baselines.",
]
meta = {
    "date": e["DATE"], "command": e["CMDLINE"], "machine": e["MACHINE"],
    "brdivert": e["BRDESC"], "tools": e["TOOLS"], "pairs": e["PAIRS"], "secs": e["SECS"], "only": e["ONLY"],
    "configs": json.loads(e["CONFIGS_JSON"]), "config_notes": e["CFGNOTES"],
    "nftsets": e.get("NFTSETS", ""), "notes": notes,
}
if e.get("NFT_SUBST"):
    meta["notes"].append(e["NFT_SUBST"])
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
python3 "$LIB" summary "$SAMPLES" "$APPLY" "$WORK/meta.json" "$OUT"
log "report: $OUT"
cat "$OUT"
