#!/usr/bin/python3
"""Connections that misbehave, for tests/adversary_servers.rs.

hold HOST PORT N [PATH]
    Opens N TCP connections and keeps them until stdin closes. With PATH,
    each sends `GET PATH` and reads its status line. Prints one JSON line:
    {"connected": n, "open": n still open after a moment, "statuses": {...}}.

idle HOST PORT DEADLINE_S
    Three connections: one that sends nothing, one that stops in the middle
    of its request head, one that finishes a keep-alive request and then
    sends nothing more. Waits (at most DEADLINE_S) until the server closed
    them all; prints {"closed": [...names...]}; exit 0 when all were closed.
"""

import json
import select
import socket
import sys
import time


def closed(s):
    """True when the peer closed (EOF or reset); never blocks."""
    try:
        r, _, _ = select.select([s], [], [], 0)
        if not r:
            return False
        return s.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


def drain(s):
    try:
        while select.select([s], [], [], 0)[0]:
            if not s.recv(65536):
                return
    except OSError:
        return


def status_line(s, deadline):
    buf = b""
    while b"\r\n" not in buf and time.time() < deadline:
        r, _, _ = select.select([s], [], [], 0.2)
        if r:
            try:
                chunk = s.recv(4096)
            except OSError:
                return "reset"
            if not chunk:
                return "closed"
            buf += chunk
    if b"\r\n" not in buf:
        return "none"
    parts = buf.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) > 1 else "bad"


def hold(host, port, n, path):
    conns, statuses = [], {}
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
        except OSError:
            statuses["connect-failed"] = statuses.get("connect-failed", 0) + 1
            s.close()
            continue
        conns.append(s)
        if path:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            st = status_line(s, time.time() + 5)
            statuses[st] = statuses.get(st, 0) + 1
    time.sleep(0.5)
    still = [s for s in conns if not closed(s)]
    print(json.dumps({"connected": len(conns), "open": len(still), "statuses": statuses}), flush=True)
    sys.stdin.read()


def idle(host, port, deadline_s):
    def conn():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect((host, port))
        return s

    silent = conn()
    partial = conn()
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    kept = conn()
    kept.sendall(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    if status_line(kept, time.time() + 10) in ("none", "closed", "reset"):
        print(json.dumps({"error": "no answer to a whole request"}), flush=True)
        sys.exit(2)
    socks = {"silent": silent, "partial-head": partial, "keep-alive": kept}
    gone = set()
    end = time.time() + deadline_s
    while time.time() < end and len(gone) < len(socks):
        for name, s in socks.items():
            if name in gone:
                continue
            drain(s)
            if closed(s):
                gone.add(name)
        time.sleep(0.2)
    print(json.dumps({"closed": sorted(gone)}), flush=True)
    sys.exit(0 if len(gone) == len(socks) else 1)


if __name__ == "__main__":
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "hold":
        hold(host, port, int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    elif cmd == "idle":
        idle(host, port, float(sys.argv[4]))
    else:
        sys.exit(f"unknown command {cmd}")
