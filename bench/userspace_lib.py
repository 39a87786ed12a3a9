#!/usr/bin/env python3
"""Helpers for bench/userspace.sh (not meant to be run by hand).

  userspace_lib.py tcp  < iperf3 -J output     print Gbit/s received (or nan)
  userspace_lib.py cps  < cps.py connect line  print connections/s (or nan)
  userspace_lib.py cpu  udp|tcp HZ NCPU SECS IDLE DP_NS T0 T1 RXFRAMES  < iperf3 -J output
        print "ns_per_packet dp_ns_per_packet rate busy_percent sent_rate" of a fixed-rate run
  userspace_lib.py summary SAMPLES OUT         write the Markdown report (settings from the
                                               environment userspace.sh exports)
"""

import json
import math
import os
import sys

from bench_common import med, parse_cps, read_json_stdin

NAN = float("nan")
LABELS = {
    "kernel": "kernel bridge",
    "user": "brdivert userspace",
    "ovs": "OVS netdev",
    "kernel-txoff": "kernel bridge, tx-csum off",
    "user-txoff": "brdivert userspace, tx-csum off",
    "user2": "brdivert userspace, the --bin2 build",
    "loop": "AF_PACKET copy loop (floor)",
}
# Targets of issue 5: the userspace datapath against the kernel bridge of the same round.
TARGETS = {"tcp": 0.8, "udp": 0.8, "cps": 0.9}


def metrics():
    e = os.environ
    pps, mbit = e.get("CPU_PPS", "?"), e.get("CPU_MBIT", "?")
    # key, label, higher is better, format
    return [
        ("tcp", "TCP throughput (Gbit/s)", True, "{:.2f}"),
        ("udp", "UDP 64-byte frames/s received (kpps)", True, "{:.0f}"),
        ("cps", "TCP connections/s", True, "{:.0f}"),
        ("cpu_udp", f"CPU per 64-byte frame at {pps} frames/s (ns, whole machine)", False, "{:.0f}"),
        ("cpu_tcp", f"CPU per 1448 B of TCP payload at {mbit} Mbit/s (ns, whole machine)", False, "{:.0f}"),
    ]


SECONDARY = [
    ("cpu_udp_dp", "fixed-rate UDP: datapath process's own CPU (ns per frame)", "{:.0f}"),
    ("cpu_udp_rate", "fixed-rate UDP: frames/s received", "{:.0f}"),
    ("cpu_udp_sent", "fixed-rate UDP: datagrams/s sent (iperf3)", "{:.0f}"),
    ("cpu_udp_busy", "fixed-rate UDP: machine busy (%)", "{:.1f}"),
    ("cpu_tcp_dp", "fixed-rate TCP: datapath process's own CPU (ns per 1448 B)", "{:.0f}"),
    ("cpu_tcp_rate", "fixed-rate TCP: Mbit/s received", "{:.0f}"),
    ("cpu_tcp_sent", "fixed-rate TCP: Mbit/s sent (iperf3)", "{:.0f}"),
    ("cpu_tcp_busy", "fixed-rate TCP: machine busy (%)", "{:.1f}"),
]


def parse_tcp() -> None:
    j = read_json_stdin()
    try:
        print("%.2f" % (j["end"]["sum_received"]["bits_per_second"] / 1e9))
    except Exception:
        print("nan")


def parse_cpu(a) -> None:
    """A fixed-rate run: busy CPU of the whole machine (wall time x CPUs - idle, idle being
    exact under NO_HZ) and the datapath process's run time (ns, or -) over the iperf3 run,
    divided by the packets it carried. Prints "ns dp_ns rate busy% sent_rate"."""
    try:
        kind, hz, ncpu, secs = a[0], int(a[1]), int(a[2]), float(a[3])
        idle, dp, t0, t1, rxf = int(a[4]), a[5], float(a[6]), float(a[7]), int(a[8])
    except Exception:
        print("nan nan nan nan nan")
        return
    j = read_json_stdin() or {}
    wall = t1 - t0
    busy_s = max(wall * ncpu - idle / hz, 0.0)
    busy_ns = busy_s * 1e9
    dp_ns = NAN if dp == "-" else float(dp)
    sent = NAN
    if kind == "udp":
        # Frames that reached the server's interface (the few TCP frames of iperf3's control
        # connection included: negligible).
        n, rate = rxf, rxf / secs
        try:
            s = j["end"]["sum"]
            sent = s["packets"] / s["seconds"]
        except Exception:
            pass
    else:
        try:
            s = j["end"]["sum_received"]
            n, rate = s["bytes"] / 1448.0, s["bits_per_second"] / 1e6
            sent = j["end"]["sum_sent"]["bits_per_second"] / 1e6
        except Exception:
            n, rate = 0, NAN
    per = (lambda x: x / n) if n > 0 else (lambda x: NAN)
    util = 100.0 * busy_s / (wall * ncpu)
    print("%.1f %.1f %.0f %.1f %.0f" % (per(busy_ns), per(dp_ns), rate, util, sent))


def fmt(f, v, scale=1.0):
    return "n/a" if math.isnan(v) else f.format(v * scale)


def summary(samples_path: str, out_path: str) -> None:
    e = os.environ
    configs = e["CONFIGS_LIST"].split()
    feat = json.loads(e.get("FEAT_JSON", "{}"))
    only = e.get("ONLY", "").split(",")
    data = {}   # (metric, config) -> {round: value}
    idle = {}
    for line in open(samples_path):
        r, cfg, metric, v = line.split()
        if metric == "idle_busy":
            idle[int(r)] = float(v)
            continue
        data.setdefault((metric, cfg), {})[int(r)] = float(v)
    ms = [m for m in metrics() if m[0] in only]

    def vals(metric, cfg):
        return data.get((metric, cfg), {})

    def ratios(metric, num, den):
        a, b = vals(metric, num), vals(metric, den)
        return [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0
                and not math.isnan(a[r]) and not math.isnan(b[r])]

    def rcell(rs):
        return "n/a" if not rs else f"**{med(rs):.2f}** ({min(rs):.2f}–{max(rs):.2f})"

    out = []
    w = out.append
    w(f"# Userspace datapaths vs the kernel bridge (issue 5), {e.get('DATE_UTC', '')}".rstrip(", "))
    w("")
    w("Command (as root, from the repository root):\n")
    w(f"```\n{e['CMDLINE']}\n```\n")
    w(f"- machine: {e['MACHINE']}")
    w(f"- brdivert: {e['BRDIVERT']}; `examples/userspace_bridge`, empty policy, batch {e['BATCH']}")
    w(f"- tools: {e['TOOLS']}")
    w(f"- {e['ROUNDS']} interleaved rounds (configuration order rotated every round), {e['SECS']} s per run")
    w("- configurations and the endpoints' offloads (client eth0, as measured by ethtool; the "
      "server's are set alike):")
    for c in configs:
        w(f"  - `{c}` ({LABELS[c]}): {feat.get(c, '?')}")
    w("")

    w("## Medians\n")
    head = ["Metric"] + [f"`{c}`" for c in configs]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for key, label, _, f in ms:
        scale = 1e-3 if key == "udp" else 1.0
        w("| " + " | ".join([label] + [fmt(f, med(list(vals(key, c).values())), scale)
                                        for c in configs]) + " |")
    for key, label, f in SECONDARY:
        if key.rsplit("_", 1)[0] not in only:
            continue
        w("| " + " | ".join([label] + [fmt(f, med(list(vals(key, c).values()))) for c in configs]) + " |")
    w("")

    others = [c for c in configs if c != "kernel"]
    w("## Ratios against the kernel bridge of the same round\n")
    w("Median of the per-round ratios, min–max in brackets. For the CPU rows lower is better "
      "(a ratio of 1.5 = 1.5× the kernel bridge's CPU per packet).\n")
    head = ["Metric"] + [f"`{c}` / `kernel`" for c in others]
    has_ktx = "kernel-txoff" in configs
    tx_others = [c for c in ("ovs", "user-txoff") if c in configs] if has_ktx else []
    head += [f"`{c}` / `kernel-txoff`" for c in tx_others]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for key, label, _, _ in ms:
        row = [label] + [rcell(ratios(key, c, "kernel")) for c in others]
        row += [rcell(ratios(key, c, "kernel-txoff")) for c in tx_others]
        w("| " + " | ".join(row) + " |")
    w("")

    us = [c for c in ("user", "user-txoff") if c in configs]
    if "ovs" in configs and us:
        w("## brdivert against Open vSwitch (same round)\n")
        w("`user` keeps the endpoints' default offloads (its normal setting), `user-txoff` has "
          "the same endpoint settings as `ovs`. Higher-is-better rows: > 1 = brdivert ahead; CPU "
          "rows: < 1 = brdivert ahead.\n")
        head = ["Metric"] + [f"`{u}` / `ovs`" for u in us]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for key, label, _, _ in ms:
            w("| " + " | ".join([label] + [rcell(ratios(key, u, "ovs")) for u in us]) + " |")
        w("")

    if "user" in configs and "user2" in configs:
        w("## `user2` (the --bin2 build) against `user` (same round)\n")
        w("Higher-is-better rows: > 1 = user2 ahead; CPU rows: < 1 = user2 ahead.\n")
        w("| Metric | `user2` / `user` |")
        w("|---|---|")
        for key, label, _, _ in ms:
            w(f"| {label} | {rcell(ratios(key, 'user2', 'user'))} |")
        w("")

    if "user" in configs and "loop" in configs:
        w("## `user` against `loop`, the bare AF_PACKET copy loop (same round)\n")
        w("How much of the technique's floor the datapath keeps while it also learns, "
          "classifies and serves its TAP. Higher-is-better rows: 1 = as fast as the bare loop.\n")
        w("| Metric | `user` / `loop` |")
        w("|---|---|")
        for key, label, _, _ in ms:
            w(f"| {label} | {rcell(ratios(key, 'user', 'loop'))} |")
        w("")

    w("## Against the targets\n")
    w("Targets (issue 5): TCP ≥ 0.8×, 64-byte pps ≥ 0.8×, connections/s ≥ 0.9× the kernel "
      "bridge, and ahead of OVS on every figure. Judged on the median of per-round ratios; "
      "\"not clear-cut\" = the per-round ratios fall on both sides of the line.\n")

    def verdict(rs, line, higher):
        if not rs:
            return "no data"
        m = med(rs)
        ok = m >= line if higher else m <= line
        split = min(rs) < line < max(rs)
        return (f"{m:.2f} → {'meets' if ok else 'MISSES'}"
                f"{' (not clear-cut: %.2f–%.2f)' % (min(rs), max(rs)) if split else ''}")

    if "user" in configs:
        names = {"tcp": "TCP", "udp": "64-byte pps", "cps": "connections/s"}
        for key, t in TARGETS.items():
            if key in only:
                w(f"- `user` / `kernel` {names[key]} ≥ {t}: {verdict(ratios(key, 'user', 'kernel'), t, True)}")
        if "user-txoff" in configs and has_ktx:
            for key, t in TARGETS.items():
                if key in only:
                    w(f"- (same endpoint settings) `user-txoff` / `kernel-txoff` {names[key]} ≥ {t}: "
                      f"{verdict(ratios(key, 'user-txoff', 'kernel-txoff'), t, True)}")
    if "ovs" in configs:
        for u in ("user", "user-txoff"):
            if u not in configs:
                continue
            for key, label, higher, _ in ms:
                w(f"- `{u}` ahead of `ovs` on {label}: "
                  f"{verdict(ratios(key, u, 'ovs'), 1.0, higher).replace('meets', 'ahead').replace('MISSES', 'NOT ahead')}")
    # Fixed-rate runs that did not carry the rate asked for.
    short = []
    for key, want, unit in (("cpu_udp_rate", e.get("CPU_PPS"), "frames/s"),
                            ("cpu_tcp_rate", e.get("CPU_MBIT"), "Mbit/s")):
        if not want:
            continue
        for c in configs:
            for r, v in sorted(vals(key, c).items()):
                if math.isnan(v) or v < 0.95 * float(want):
                    short.append(f"round {r} `{c}`: {v:.0f} of {want} {unit}")
    if short:
        w(f"- fixed-rate runs short of 95% of the rate asked (their CPU figure covers fewer "
          f"packets than asked): {'; '.join(short)}")
    w("")

    w("## Per round\n")
    for key, label, _, f in ms + [(k, l, None, f) for k, l, f in SECONDARY if k.rsplit("_", 1)[0] in only]:
        w(f"{label}:\n")
        head = ["round"] + [f"`{c}`" for c in configs]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        rounds = sorted({r for c in configs for r in vals(key, c)})
        for r in rounds:
            scale = 1e-3 if key == "udp" else 1.0
            w("| " + " | ".join([str(r)] + [fmt(f, vals(key, c).get(r, NAN), scale) for c in configs]) + " |")
        w("")
    if idle:
        w("Idle machine before each round (busy %, 2 s, no traffic, no datapath): "
          + ", ".join(f"round {r}: {v:.1f}" for r, v in sorted(idle.items())) + "\n")

    w("## Method\n")
    notes = [
        "Topology: client, bridge host and server network namespaces joined by two veth pairs "
        "(pc, ps in the bridge host); every configuration bridges the same pc and ps, one at a "
        "time: `kernel` a kernel bridge (STP off, no nft rules), `user` brdivert's userspace "
        "datapath (`examples/userspace_bridge`, empty policy, TAP local port), `ovs` Open vSwitch "
        "with `datapath_type=netdev` and NORMAL (MAC-learning) forwarding, its own ovsdb-server and "
        "ovs-vswitchd started per round with private paths (database, sockets, pidfiles, logs in "
        "the bench's work dir; a system Open vSwitch is never contacted). The userspace datapath "
        "and OVS are started fresh every round. No process is pinned. `loop` (when measured) "
        "is `examples/afpacket_copy_loop`: one thread per direction, poll + recvmmsg on one "
        "port's AF_PACKET socket, sendmmsg of the same frames (vnet header included) on the "
        "other's, with the datapath's port I/O and nothing else (no FDB, policy, TAP, ring or "
        "busy polling): the floor of the technique on this machine.",
        "Endpoint offloads: OVS's netdev datapath reads frames over AF_PACKET without vnet "
        "headers, so a frame whose checksum was left to offload would reach the receiver with a "
        "bad checksum; `ovs` therefore runs with `ethtool -K eth0 tx off` on both endpoints, which "
        "also turns TSO off (MTU-sized frames). `kernel` and `user` keep the default offloads "
        "(the userspace datapath carries vnet headers and needs no tuning); `kernel-txoff` and "
        "`user-txoff` repeat them with OVS's endpoint settings, so each figure can be compared on "
        "equal terms as well.",
        "TCP: iperf3, one stream, receiver's bit rate. UDP: iperf3 -u -l 18 -b 0 (18-byte "
        "payload = 60-byte frame, 64 bytes with FCS), frames that reached the server's "
        "interface (rx_packets delta) per second of sending. Connections/s: bench/cps.py (one "
        "Python client: connect, wait for the server's FIN, close).",
        "CPU per packet: a separate run at a fixed rate (UDP 64-byte frames at --cpu-pps; TCP at "
        "--cpu-mbit, both below what every datapath carries, so every configuration carries the "
        "same load). Busy CPU of the whole machine = wall time x CPUs - (idle + iowait) from "
        "/proc/stat, between just before and just after the iperf3 client; with NO_HZ the kernel "
        "measures idle time at idle entry and exit, so it is exact, while /proc/stat's busy "
        "fields (user, system, softirq) are tick samples that miss most of a light, bursty load "
        "(this kernel has no VIRT_CPU_ACCOUNTING_GEN/IRQ_TIME_ACCOUNTING). Divided by the "
        "packets carried: 64-byte frames received at the server (UDP), or bytes of TCP payload "
        "received / 1448 (one MSS-sized packet's worth; with TSO the frames are fewer and "
        "bigger, which is the point). The same for every configuration: the kernel bridge's "
        "forwarding runs in softirq context on whichever CPU the sender's transmit lands, so it "
        "cannot be attributed to a process; counting the whole machine needs no attribution. "
        "Sender, receiver and iperf3's own cost are in every figure alike, so the differences "
        "between configurations are the datapaths' (and the absolute numbers are not the "
        "datapath's alone). The datapath process's own run time (sum over its threads of "
        "/proc/PID/task/*/schedstat, exact: userspace_bridge or ovs-vswitchd) is shown beside "
        "it; it excludes kernel work its sockets cause in other tasks' softirq. Resolution: "
        f"1/{e.get('HZ', '100')} s of idle time per CPU; other processes' CPU is included, see "
        "the idle figures. At -b 0 (the throughput runs) the machine is saturated in every "
        "configuration, which is why CPU per packet is measured at a fixed rate instead.",
        "Noise: on this shared 2-CPU VM single runs vary by ±15% and more (see the kernel "
        "datapath's A/A check in docs/performance.md); ratios are taken per round and their "
        "median is reported, with the min–max.",
    ]
    for n in notes:
        w(f"- {n}")
    w("")
    w("## Raw samples\n")
    w("round config metric value (tcp Gbit/s, udp frames/s, cps connections/s, cpu_* ns per "
      "packet, *_rate frames/s or Mbit/s, *_busy %, idle_busy %)\n")
    w("```")
    w(open(samples_path).read().rstrip())
    w("```")
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> None:
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "tcp":
        parse_tcp()
    elif a[0] == "cps":
        parse_cps()
    elif a[0] == "cpu":
        parse_cpu(a[1:])
    elif a[0] == "summary" and len(a) == 3:
        summary(a[1], a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
