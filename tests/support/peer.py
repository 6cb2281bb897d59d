#!/usr/bin/env python3
"""Test peer for egret's namespace tests: real sockets, nothing simulated.

  tcp-server HOST PORT        echo server (one thread per connection)
  udp-server HOST PORT        echo server
  tcp-connect HOST PORT       exit 0 if a connection and an echo round trip work
  udp-send HOST PORT          exit 0 if a datagram comes back
  hold HOST PORT              connect, print "connected", wait for a line on stdin,
                              then do an echo round trip on the same connection
"""
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


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run = {"tcp-server": tcp_server, "udp-server": udp_server, "tcp-connect": tcp_connect, "udp-send": udp_send, "hold": hold}[mode]
    sys.exit(run(host, port) or 0)


if __name__ == "__main__":
    main()
