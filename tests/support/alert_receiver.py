#!/usr/bin/env python3
"""Real receivers for egret's alert tests. Each appends one JSON object per
received alert to OUT and prints "listening" once it is ready.

  http HOST PORT OUT [CERT KEY]   HTTP(S) server recording each POST (path,
                                  headers, JSON body); answers 200
  syslog-udp HOST PORT OUT        RFC 5424 over UDP, one message per datagram
  syslog-tcp HOST PORT OUT        RFC 5424 over TCP, octet-counted (RFC 6587)
  syslog-unix PATH OUT            the syslog(3) format on a Unix datagram socket
                                  (like /dev/log): <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG,
                                  MSG ending with " @cee: {JSON fields}"

Network syslog messages are parsed by the RFC 5424 grammar (section 6); a
message that does not parse is recorded as {"error": ..., "raw": ...}.
"""
import json
import os
import re
import socket
import sys
import threading
import time

LOCK = threading.Lock()


def record(out, obj):
    with LOCK, open(out, "a") as f:
        f.write(json.dumps(obj) + "\n")


# --- RFC 5424 -------------------------------------------------------------

PRINTUSASCII = "".join(chr(c) for c in range(33, 127))
TIMESTAMP = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
)


class ParseError(Exception):
    pass


class Cursor:
    def __init__(self, text):
        self.t, self.i = text, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else ""

    def take(self, c):
        if self.peek() != c:
            raise ParseError(f"expected {c!r} at {self.i}, found {self.peek()!r}")
        self.i += 1

    def field(self, maxlen, name):
        """A header field: 1*maxlen PRINTUSASCII, ended by SP."""
        j = self.t.find(" ", self.i)
        if j < 0:
            raise ParseError(f"{name}: no SP after it")
        v = self.t[self.i:j]
        if not v or len(v) > maxlen or any(c not in PRINTUSASCII for c in v):
            raise ParseError(f"{name}: invalid {v!r}")
        self.i = j + 1
        return v

    def sd_name(self):
        start = self.i
        while self.peek() and self.peek() in PRINTUSASCII and self.peek() not in '= ]"':
            self.i += 1
        v = self.t[start:self.i]
        if not 1 <= len(v) <= 32:
            raise ParseError(f"SD-NAME {v!r} at {start}")
        return v

    def param_value(self):
        out = []
        while True:
            c = self.peek()
            if c == "":
                raise ParseError("unterminated PARAM-VALUE")
            if c == "\\" and self.i + 1 < len(self.t) and self.t[self.i + 1] in '"\\]':
                out.append(self.t[self.i + 1])
                self.i += 2
            elif c == '"':
                return "".join(out)
            elif c == "]":
                raise ParseError("unescaped ']' in PARAM-VALUE")
            else:
                out.append(c)
                self.i += 1


def parse_5424(data):
    text = data.decode("utf-8")
    c = Cursor(text)
    c.take("<")
    m = re.match(r"\d{1,3}", text[c.i:])
    if not m or int(m.group()) > 191:
        raise ParseError("PRI")
    pri = int(m.group())
    c.i += len(m.group())
    c.take(">")
    m = re.match(r"[1-9]\d{0,2}", text[c.i:])
    if not m:
        raise ParseError("VERSION")
    version = int(m.group())
    c.i += len(m.group())
    c.take(" ")
    timestamp = c.field(64, "TIMESTAMP")
    if timestamp != "-" and not TIMESTAMP.match(timestamp):
        raise ParseError(f"TIMESTAMP {timestamp!r}")
    hostname = c.field(255, "HOSTNAME")
    app = c.field(48, "APP-NAME")
    procid = c.field(128, "PROCID")
    msgid = c.field(32, "MSGID")
    sd = {}
    if c.peek() == "-":
        c.i += 1
    else:
        while c.peek() == "[":
            c.take("[")
            sd_id = c.sd_name()
            params = {}
            while c.peek() == " ":
                c.take(" ")
                name = c.sd_name()
                c.take("=")
                c.take('"')
                params[name] = c.param_value()
                c.take('"')
            c.take("]")
            sd[sd_id] = params
        if not sd:
            raise ParseError("STRUCTURED-DATA")
    msg, bom = None, False
    if c.i < len(text):
        c.take(" ")
        msg = text[c.i:]
        if msg.startswith("\ufeff"):
            msg, bom = msg[1:], True
    return {
        "pri": pri, "facility": pri // 8, "severity": pri % 8, "version": version,
        "timestamp": timestamp, "hostname": hostname, "app_name": app,
        "procid": procid, "msgid": msgid, "sd": sd, "msg": msg, "bom": bom,
    }


LOCAL = re.compile(
    r"<(\d{1,3})>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) ([!-9;-Z\\^-~]{1,32})\[(\d+)\]: (.*)\Z",
    re.S,
)


def parse_local(data):
    text = data.decode("utf-8")
    m = LOCAL.match(text)
    if not m:
        raise ParseError("not <PRI>TIMESTAMP TAG[PID]: MSG")
    msg, cookie, fields = m.group(5).partition(" @cee: ")
    if not cookie:
        raise ParseError("no @cee: fields")
    pri = int(m.group(1))
    return {
        "pri": pri, "facility": pri // 8, "severity": pri % 8,
        "timestamp": m.group(2), "app_name": m.group(3), "procid": m.group(4),
        "msg": msg, "fields": json.loads(fields),
    }


def record_syslog(out, data, parse=parse_5424):
    try:
        record(out, parse(data))
    except (ParseError, UnicodeDecodeError, ValueError) as e:
        record(out, {"error": str(e), "raw": data.decode("utf-8", "replace")})


def syslog_udp(host, port, out):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    print("listening", flush=True)
    while True:
        data, _ = s.recvfrom(65535)
        record_syslog(out, data)


def syslog_unix(path, out):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    os.chmod(path, 0o666)
    print("listening", flush=True)
    while True:
        record_syslog(out, s.recv(65535), parse_local)


def syslog_tcp(host, port, out):
    srv = socket.create_server((host, int(port)))
    print("listening", flush=True)

    def serve(conn):
        buf = b""
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                # MSG-LEN SP SYSLOG-MSG (RFC 6587 3.4.1)
                while b" " in buf:
                    length, rest = buf.split(b" ", 1)
                    if not length.isdigit():
                        record(out, {"error": f"bad frame length {length!r}"})
                        return
                    if len(rest) < int(length):
                        break
                    record_syslog(out, rest[: int(length)])
                    buf = rest[int(length):]

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# --- HTTP -----------------------------------------------------------------

def http(host, port, out, cert=None, key=None):
    import http.server
    import ssl

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                doc = json.loads(body)
            except ValueError as e:
                doc = {"error": str(e)}
            record(out, {
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "user_agent": self.headers.get("User-Agent"),
                "authorization": self.headers.get("Authorization"),
                "received_at": time.time(),
                "body": doc,
            })
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("listening", flush=True)
    srv.serve_forever()


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    {
        "http": http,
        "syslog-udp": syslog_udp,
        "syslog-tcp": syslog_tcp,
        "syslog-unix": syslog_unix,
    }[mode](*args)


if __name__ == "__main__":
    main()
