"""Stand-in for Squid when it is not installed: a tiny NAT-intercepting HTTP relay.

Accepts connections REDIRECTed to PORT, finds the original destination (SO_ORIGINAL_DST),
forwards the request there with `Via` and `Connection: close` added, and returns the reply
with a `Via` header. Each request is logged to ACCESSLOG, Squid-style (one line each).

usage: intercept.py PORT ACCESSLOG
"""
import socket
import struct
import sys
import threading
import time

PORT, LOG = int(sys.argv[1]), sys.argv[2]
SO_ORIGINAL_DST = 80
VIA = b"Via: 1.1 brdivert-lab (fallback-intercept)\r\n"


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def handle(conn, peer):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack("!2xH4s8x", raw)
        dst = socket.inet_ntoa(ip)
        req = read_head(conn)
        head, _, rest = req.partition(b"\r\n\r\n")
        lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
        out = b"\r\n".join(lines) + b"\r\n" + VIA + b"Connection: close\r\n\r\n" + rest
        up = socket.create_connection((dst, port), timeout=5)
        up.sendall(out)
        resp = b""
        while True:
            chunk = up.recv(65536)
            if not chunk:
                break
            resp += chunk
        up.close()
        status, _, tail = resp.partition(b"\r\n")
        conn.sendall(status + b"\r\n" + VIA + tail)
        first = lines[0].decode(errors="replace") if lines else "-"
        with open(LOG, "a") as f:
            f.write("%.3f %s %s ORIGINAL_DST/%s:%d\n" % (time.time(), peer[0], first, dst, port))
    except OSError:
        pass
    finally:
        conn.close()


def main():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", PORT))
    s.listen(128)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


main()
