#!/usr/bin/env python3
"""A stand-in for a Java service with Log4Shell (CVE-2021-44228): it logs the
User-Agent of every request, and its "logger" resolves ${jndi:ldap://host:port/x}
by connecting to that LDAP server to fetch a class, as log4j 2.0-2.14 did.
Usage: vulnerable_service.py LISTEN_IP PORT"""
import http.server
import re
import socket
import sys

JNDI = re.compile(r"\$\{jndi:ldap://([^:/}]+):(\d+)/[^}]*\}")


def log(message):
    print(f"log: {message}", flush=True)
    m = JNDI.search(message)
    if m:  # the bug: a logged string triggers an outbound lookup
        host, port = m.group(1), int(m.group(2))
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(b"0\x0c\x02\x01\x01`\x07\x02\x01\x03\x04\x00\x80\x00")  # LDAP bind
                payload = s.recv(4096)
            print(f"jndi: fetched {len(payload)} bytes from {host}:{port}: exploited", flush=True)
        except OSError as e:
            print(f"jndi: lookup of {host}:{port} failed: {e}", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log(f"GET {self.path} from {self.client_address[0]} UA={self.headers.get('User-Agent')}")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *args):
        pass


server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
print("listening", flush=True)
server.serve_forever()
