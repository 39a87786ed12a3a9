"""Helpers the bench scripts' report libraries share (kernel_lib, queue_lib, userspace_lib):
parsing the measuring tools' JSON and taking medians that skip failed runs."""
import json
import math
import statistics
import sys


def read_json_stdin():
    """The JSON document on stdin, or None if there is none."""
    try:
        return json.load(sys.stdin)
    except Exception:
        return None


def parse_cps() -> None:
    """bench/cps.py's last JSON line on stdin -> its connections/s ("nan" if missing); more
    than 1 % failed connections is reported on stderr."""
    try:
        j = json.loads(sys.stdin.read().strip().splitlines()[-1])
        if j["errors"] > 0.01 * max(j["conns"], 1):
            print(f"cps: {j['errors']} errors for {j['conns']} connections", file=sys.stderr)
        print(j["cps"])
    except Exception:
        print("nan")


def med(xs):
    """Median of the values that are not NaN (NaN if none are)."""
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan
