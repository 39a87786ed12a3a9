#!/usr/bin/env python3
"""TCP connections-per-second load generator for bench/kernel.sh.

Deliberately simple (one process per side, no threads, no async):

  cps.py serve  HOST PORT          accept loop: accept, close at once (server closes first,
                                   so TIME_WAIT lands on the server, not on the client's
                                   ephemeral ports); runs until killed
  cps.py connect HOST PORT SECS    bounded loop for SECS seconds: connect, wait for the
                                   server's FIN (recv returns b""), close; prints one JSON
                                   line {"conns", "errors", "seconds", "cps"}

One iteration is a whole TCP life cycle through the bridge: SYN, SYN-ACK, ACK, FIN, ACK,
FIN, ACK (7 frames, 4 of them client->server). The rate is bounded by the CPU cost of
Python + the kernel's connection setup on a 2-core box, not by the wire, so this measures
the per-connection cost that bridge rules add on top of that, which is what we compare
between configurations (same generator, same run, interleaved).
"""

import json
import socket
import sys
import time


def serve(host: str, port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)
    while True:
        try:
            c, _ = ls.accept()
        except InterruptedError:
            continue
        c.close()


def connect(host: str, port: int, secs: float) -> None:
    addr = (host, port)
    conns = errors = 0
    start = time.perf_counter()
    deadline = start + secs
    now = start
    while now < deadline:
        # Check the clock every 64 connections only: it is cheap, but not free.
        for _ in range(64):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.connect(addr)
                s.recv(1)  # the server's FIN
                conns += 1
            except OSError:
                errors += 1
            finally:
                s.close()
        now = time.perf_counter()
    elapsed = now - start
    print(json.dumps({"conns": conns, "errors": errors, "seconds": round(elapsed, 4),
                      "cps": round(conns / elapsed, 1)}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
