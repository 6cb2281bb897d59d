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
  https-server HOST PORT CERT KEY
                              HTTPS server answering every GET with "hello"
  proxy-hold PROXY PORT HOST:PORT
                              CONNECT through the proxy at PROXY:PORT to an echo
                              server, print "connected", wait for a line on stdin,
                              then do an echo round trip through the tunnel
  proxy-raw PROXY PORT TEXT   send TEXT (with \r\n escapes) to the proxy, print the
                              first line of the answer
  proxy-keepalive PROXY PORT URL N
                              N HTTP/1.0 keep-alive GETs of URL on one connection to
                              the proxy; print how many were answered before it closed
  proxy-tls PROXY PORT HOST:PORT SNI
                              CONNECT, then a TLS handshake naming SNI and GET /;
                              print the HTTP status line, or "closed"
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


def held_round_trip(s, label):
    """Says "connected", waits for a line on stdin, then tries an echo round trip."""
    print("connected", flush=True)
    sys.stdin.readline()
    s.settimeout(3 * TIMEOUT)
    try:
        ok = round_trip(s)
    except OSError as e:
        print(f"{label}: {e}", file=sys.stderr)
        ok = False
    print("ok" if ok else "stalled", flush=True)
    return 0 if ok else 1


def hold(host, port):
    return held_round_trip(socket.create_connection((host, port), timeout=TIMEOUT), "hold")


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


def udp_ports(host, first, n):
    """One datagram to each of n ports from `first` on, then hold the socket."""
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    for port in range(first, first + int(n)):
        s.sendto(b"x", (host, port))
    print(os.getpid(), flush=True)
    sys.stdin.read()
    return 0


def https_server(host, port, cert, key):
    import http.server
    import ssl

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, port), Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


def proxy_connect(proxy, port, target):
    s = socket.create_connection((proxy, port), timeout=3 * TIMEOUT)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    return s, head.split(b"\r\n", 1)[0].decode(errors="replace")


def proxy_hold(proxy, port, target):
    s, status = proxy_connect(proxy, port, target)
    if " 200" not in status:
        print(status, flush=True)
        return 1
    return held_round_trip(s, "proxy-hold")


def proxy_raw(proxy, port, text):
    s = socket.create_connection((proxy, port), timeout=3 * TIMEOUT)
    s.sendall(text.encode().decode("unicode_escape").encode("latin-1"))
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    print(data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed", flush=True)
    return 0


def proxy_keepalive(proxy, port, url, n):
    s = socket.create_connection((proxy, port), timeout=3 * TIMEOUT)
    f = s.makefile("rb")
    answered = 0
    for _ in range(int(n)):
        try:
            s.sendall(f"GET {url} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n".encode())
            status = f.readline()
            if not status.startswith(b"HTTP/"):
                break
            length = None
            while True:
                line = f.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                break
            f.read(length)
            answered += 1
        except OSError:
            break
    print(answered, flush=True)
    return 0


def proxy_tls(proxy, port, target, sni):
    import ssl

    s, status = proxy_connect(proxy, port, target)
    if " 200" not in status:
        print(status, flush=True)
        return 1
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        print(t.recv(4096).split(b"\r\n", 1)[0].decode(), flush=True)
        return 0
    except (OSError, ssl.SSLError):
        print("closed", flush=True)
        return 1


def main():
    mode, host, port, rest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    run = {"tcp-server": tcp_server, "udp-server": udp_server, "tcp-connect": tcp_connect,
           "udp-send": udp_send, "hold": hold, "try-tcp": try_tcp, "try-udp": try_udp,
           "flood-udp": flood_udp, "udp-ports": udp_ports, "https-server": https_server, "proxy-hold": proxy_hold,
           "proxy-raw": proxy_raw, "proxy-tls": proxy_tls, "proxy-keepalive": proxy_keepalive}[mode]
    sys.exit(run(host, port, *rest) or 0)


if __name__ == "__main__":
    main()
