#!/usr/bin/env python3
"""Helpers for bench/queue.sh (not meant to be run by hand).

  queue_lib.py cps     < cps.py connect output           print "cps conns errors" (nan 0 0)
  queue_lib.py status  < brdivert status --json           print the queue figures (one line)
  queue_lib.py summary SAMPLES OUT                        write the Markdown report (metadata
                                                          from the environment, see queue.sh)
"""

import json
import math
import os
import sys

from bench_common import med

LABELS = {
    "bare": "bare bridge",
    "bare2": "bare bridge (A/A)",
    "noqueue": "rules, no queue",
    "queue": "rules, decide = queue",
}
METRICS = [
    ("tcp", "Bulk TCP to the server (Gbit/s)", "{:.2f}"),
    ("cps", "Connections/s to the server (queue: queued, bypassed)", "{:.0f}"),
    ("cps_vip", "Connections/s to the local VIP (queue: queued, diverted)", "{:.0f}"),
]
TARGETS = {"tcp": 0.95, "cps": 0.8, "cps_vip": 0.8}


def parse_cps() -> None:
    try:
        j = json.loads(sys.stdin.read().strip().splitlines()[-1])
        print(j["cps"], j["conns"], j["errors"])
    except Exception:
        print("nan 0 0")


def parse_status() -> None:
    """packets divert bypass drop errors queue_drops p50_us p99_us latency_count ("nan" if
    the status has no queue section or no latency yet)."""
    try:
        q = json.load(sys.stdin)["queue"] or {}
    except Exception:
        q = {}
    keys = ["packets", "divert", "bypass", "drop", "errors", "queue_drops",
            "latency_p50_us", "latency_p99_us", "latency_count"]
    print(" ".join("nan" if q.get(k) is None else str(q[k]) for k in keys))


def summary(samples_path: str, out_path: str) -> None:
    e = os.environ
    configs = e["CONFIGS_LIST"].split()
    data = {}
    for line in open(samples_path):
        r, cfg, metric, v = line.split()
        data.setdefault((metric, cfg), {})[int(r)] = float(v)

    def vals(metric, cfg):
        return data.get((metric, cfg), {})

    def ratios(metric, cfg, base_metric, base_cfg):
        a, b = vals(metric, cfg), vals(base_metric, base_cfg)
        return [a[r] / b[r] for r in a if r in b and b[r] > 0 and not math.isnan(a[r])]

    def cell(rs):
        return f"**{med(rs):.3f}** ({min(rs):.2f}-{max(rs):.2f})" if rs else "n/a"

    out = []
    w = out.append
    w(f"# Queue decisions benchmark, {e['DATE']}\n")
    if e.get("QUICK") == "1":
        w("**Smoke run (--quick): checks that the setup works; the figures below are not a "
          "measurement and must not be quoted.**\n")
    w("Command (from the repository root):\n")
    w(f"```\n{e['CMDLINE']}\n```\n")
    w(f"- machine: {e['MACHINE']}")
    w(f"- brdivert: {e['BRDESC']}")
    w(f"- tools: {e['TOOLS']}")
    w(f"- {e['QUEUE_FORM']}")
    w(f"- {e['PAIRS']} interleaved rounds (order rotated every round), {e['SECS']} s per run; "
      f"configurations: {', '.join(LABELS[c] for c in configs)}\n")

    w("## Throughput and connection rate (medians; ratio = median of per-round ratios "
      "against the bare bridge of the same round, min-max in brackets)\n")
    others = [c for c in configs if c != "bare"]
    head = ["Metric", LABELS["bare"]]
    for c in others:
        head += [LABELS[c], f"{c} / bare"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    verdicts = []
    for metric, label, fmt in METRICS:
        base_metric = "cps" if metric == "cps_vip" else metric
        base = vals(base_metric, "bare")
        if not base:
            continue
        row = [label, fmt.format(med(list(vals(metric, "bare").values())))
               if vals(metric, "bare") else "-"]
        for c in others:
            v = vals(metric, c)
            if not v:
                row += ["-", "-"]
                continue
            rs = ratios(metric, c, base_metric, "bare")
            row += [fmt.format(med(list(v.values()))), cell(rs)]
            if c in ("queue",) and rs:
                ok = med(rs) >= TARGETS[metric]
                verdicts.append(f"- {label}: queue / bare = {med(rs):.3f} -> "
                                f"{'meets' if ok else 'MISSES'} the >= {TARGETS[metric]} target")
        w("| " + " | ".join(row) + " |")
    w("")
    w("`cps_vip` has no bare-bridge value (a bare bridge does not divert): its ratios are "
      "against the bare bridge's connections/s to the server in the same round (a local "
      "server on the bridge host against a remote one, so it includes that difference). "
      "The queue's own cost on diverted connections is the next table.\n")
    # With an A/A configuration: medians against the pooled baseline (bare and bare2
    # together), less sensitive to one unlucky bare run than the per-round pairs.
    if "bare2" in configs:
        w("Against the pooled baseline (medians; baseline = every bare and A/A run):\n")
        head = ["Metric"] + [f"{LABELS[c]} / pooled" for c in configs]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for metric, label, _ in METRICS:
            base_metric = "cps" if metric == "cps_vip" else metric
            pool = list(vals(base_metric, "bare").values()) + \
                list(vals(base_metric, "bare2").values())
            pm = med(pool)
            if not pool or not pm or math.isnan(pm):
                continue
            row = [label] + [f"{med(list(vals(metric, c).values())) / pm:.3f}"
                             if vals(metric, c) else "-" for c in configs]
            w("| " + " | ".join(row) + " |")
        w("")
    rs = ratios("cps_vip", "queue", "cps_vip", "noqueue")
    rs2 = ratios("cps", "queue", "cps", "noqueue")
    rs3 = ratios("tcp", "queue", "tcp", "noqueue")
    w("| queue / noqueue (same round) | ratio |")
    w("|---|---|")
    w(f"| Connections/s to the VIP (diverted) | {cell(rs)} |")
    w(f"| Connections/s to the server (bypassed) | {cell(rs2)} |")
    w(f"| Bulk TCP to the server (bypassed) | {cell(rs3)} |")
    w("")

    w("## Verdict latency and decisions (queue rounds; `brdivert status --json` at the end "
      "of each round, the daemon started fresh for the round)\n")
    w("| round | queued | divert | bypass | drop | errors | queue drops | expected divert (VIP "
      "connections) | expected bypass (server connections + 2 iperf3) | p50 µs | p99 µs | "
      "latency samples |")
    w("|" + "---|" * 12)
    qkeys = ["q_packets", "q_divert", "q_bypass", "q_drop", "q_errors", "q_queue_drops",
             "q_expected_divert", "q_expected_bypass", "q_p50_us", "q_p99_us",
             "q_latency_count"]
    rounds = sorted(vals("q_packets", "queue"))
    for r in rounds:
        cells = []
        for k in qkeys:
            v = vals(k, "queue").get(r, math.nan)
            cells.append("-" if math.isnan(v) else f"{v:.0f}")
        w(f"| {r} | " + " | ".join(cells) + " |")
    p50 = med(list(vals("q_p50_us", "queue").values()))
    p99s = [v for v in vals("q_p99_us", "queue").values() if not math.isnan(v)]
    if p99s:
        w(f"\nMedian over rounds: p50 {p50:.0f} µs, p99 {med(p99s):.0f} µs (worst round "
          f"p99 {max(p99s):.0f} µs). Values are bucket upper bounds (1, 2, 5, 10, 20, 50, "
          "100 µs …); latency runs from `recv` returning to the verdict being sent and "
          "excludes the kernel's queueing time.\n")
    errs = [(k, c, r, v) for (k, c), d in data.items() if k.endswith("errors")
            for r, v in d.items() if v > 0]
    # Every measured connection must have been queued exactly once and decided as planned.
    for r in rounds:
        for got, want in (("q_divert", "q_expected_divert"), ("q_bypass", "q_expected_bypass")):
            g = vals(got, "queue").get(r, math.nan)
            x = vals(want, "queue").get(r, math.nan)
            if g != x:
                errs.append((f"{got} {g:.0f} != {want}", "queue", r, x))
    w("## Against the targets (bulk TCP >= 0.95x bare, connections/s >= 0.8x bare)\n")
    w("\n".join(verdicts) if verdicts else "- no data")
    if errs:
        w("\n**Errors seen** (connection failures or queue errors; the figures of these runs "
          "are suspect): " + ", ".join(f"round {r} {c} {k} {v:.0f}" for k, c, r, v in errs))
    w("")
    w("## Notes\n")
    for n in [
        "Topology: three network namespaces, veth pairs, one kernel bridge (STP off) created "
        "by the script; brdivert's settings name it, so brdivert reuses it and flush removes "
        "only its tables and restores the bridge's br_netfilter options.",
        "br_netfilter: off (namespace sysctls and the bridge's own options) in bare and "
        "noqueue; in queue brdivert turns the bridge's nf_call_iptables/ip6tables on, so "
        "every bridged packet also crosses the IP hooks and conntrack: that cost is part of "
        "the queue figures, as it is of any deployment of queue rules.",
        "The VIP is served by a cps.py server on the bridge host (no proxy in the path): a "
        "diverted connection costs the queue round trip of its SYN and the local delivery. "
        "Connections to the server are allow-listed (`brdivert allow add`): the daemon "
        "answers bypass, so they pay the queue round trip and are then bridged. In noqueue "
        "the same rules are decided in the kernel (`except_dst` stands for the allow list).",
        "Pinning: servers on CPU 1, clients on CPU 0; the daemon's queue thread is not "
        "pinned. The conntrack table of the bridge ns is flushed before every cps run "
        f"({'conntrack -F' if e.get('HAVE_CONNTRACK') == '1' else 'conntrack tool absent: NOT flushed'}), "
        "so TIME_WAIT entries of earlier runs do not pile up.",
        "Connections/s: bench/cps.py (one Python client: connect, wait for the server's "
        "FIN, close). Python's own cost dominates the absolute number; the ratio shows the "
        "per-connection cost added.",
        "Noise: on a shared 2-core VM single runs vary by about +-15%; use --aa and compare "
        "with the A/A column.",
    ]:
        w(f"- {n}")
    w("")
    w("## Raw samples\n")
    w("round config metric value\n")
    w("```")
    w(open(samples_path).read().rstrip())
    w("```")
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> None:
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "cps":
        parse_cps()
    elif a[0] == "status":
        parse_status()
    elif a[0] == "summary":
        summary(a[1], a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
