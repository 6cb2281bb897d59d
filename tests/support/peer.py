#!/usr/bin/env python3
"""Test peer for egret's namespace tests: real sockets, nothing simulated.

  tcp-server HOST PORT        echo server (one thread per connection)
  udp-server HOST PORT        echo server
  tcp-connect HOST PORT       exit 0 if a connection and an echo round trip work
  udp-send HOST PORT          exit 0 if a datagram comes back
  hold HOST PORT              connect, print "connected", wait for a line on stdin,
                              then do an echo round trip on the same connection
  try-tcp HOST PORT           start a connect (no wait), print our pid, then stay
                              alive (SYN retries go on) until stdin closes
  try-udp HOST PORT [N]       send N datagrams (default 1) 0.2 s apart, print our
                              pid, then stay alive until stdin closes
  flood-udp HOST PORT N       send N datagrams as fast as possible; print how many
                              sends the firewall refused (EPERM)
"""
import errno
import os
import time
import socket
import sys
import threading

TIMEOUT = 1.5


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def echo_tcp(conn):
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)


def tcp_server(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family(host) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()


def udp_server(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    if family(host) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    print("listening", flush=True)
    while True:
        data, addr = s.recvfrom(4096)
        s.sendto(data, addr)


def round_trip(s):
    s.sendall(b"ping\n")
    return s.recv(16) == b"ping\n"


def tcp_connect(host, port):
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            return 0 if round_trip(s) else 1
    except OSError as e:
        print(f"tcp-connect: {e}", file=sys.stderr)
        return 1


def udp_send(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(b"ping\n", (host, port))
        data, _ = s.recvfrom(16)
        return 0 if data == b"ping\n" else 1
    except OSError as e:
        print(f"udp-send: {e}", file=sys.stderr)
        return 1


def hold(host, port):
    s = socket.create_connection((host, port), timeout=TIMEOUT)
    print("connected", flush=True)
    sys.stdin.readline()
    s.settimeout(3 * TIMEOUT)
    try:
        ok = round_trip(s)
    except OSError as e:
        print(f"hold: {e}", file=sys.stderr)
        ok = False
    print("ok" if ok else "stalled", flush=True)
    return 0 if ok else 1


def try_tcp(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    print(os.getpid(), flush=True)
    sys.stdin.read()
    return 0


def try_udp(host, port, n=1):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    print(os.getpid(), flush=True)
    for i in range(int(n)):
        if i:
            time.sleep(0.2)
        try:
            s.sendto(b"x", (host, port))
        except PermissionError:
            pass
    sys.stdin.read()
    return 0


def flood_udp(host, port, n):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    refused = 0
    for _ in range(int(n)):
        try:
            s.sendto(b"x", (host, port))
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            refused += 1
    print(refused, flush=True)
    return 0


def main():
    mode, host, port, rest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    run = {"tcp-server": tcp_server, "udp-server": udp_server, "tcp-connect": tcp_connect,
           "udp-send": udp_send, "hold": hold, "try-tcp": try_tcp, "try-udp": try_udp,
           "flood-udp": flood_udp}[mode]
    sys.exit(run(host, port, *rest) or 0)


if __name__ == "__main__":
    main()
