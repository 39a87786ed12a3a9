"""brdivert lab origin: HTTP servers that answer with the peer they see and echo the
request headers, plus a UDP echo. Every HTTP request is also appended to a log file as one
JSON line, so the lab can ask what the origin saw.

usage: origin.py NAME LOGFILE BIND --http PORT [--http PORT ...] [--udp PORT ...]
"""
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, LOG, BIND = sys.argv[1], sys.argv[2], sys.argv[3]
LOCK = threading.Lock()


def peer(addr):
    host = addr[0]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return host


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        local = self.connection.getsockname()
        seen = {
            "server": NAME,
            "peer": peer(self.client_address),
            "local": peer(local),
            "port": local[1],
            "path": self.path,
            "headers": {k: v for k, v in self.headers.items()},
        }
        body = (json.dumps(seen, sort_keys=True) + "\n").encode()
        with LOCK:
            with open(LOG, "a") as f:
                f.write(json.dumps(seen, sort_keys=True) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Lab-Server", NAME)
        self.send_header("X-Lab-Peer", seen["peer"])
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, family):
        self.address_family = family
        super().__init__(addr, Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_echo(port):
    family = socket.AF_INET6 if ":" in BIND else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((BIND, port))
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)


def main():
    args = sys.argv[4:]
    family = socket.AF_INET6 if ":" in BIND else socket.AF_INET
    threads = []
    for flag, port in zip(args[0::2], args[1::2]):
        if flag == "--http":
            srv = Server((BIND, int(port)), family)
            threads.append(threading.Thread(target=srv.serve_forever, daemon=True))
        elif flag == "--udp":
            threads.append(threading.Thread(target=udp_echo, args=(int(port),), daemon=True))
        else:
            sys.exit("unknown flag " + flag)
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


main()
