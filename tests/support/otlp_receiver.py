#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver for egret's tests, decoding with the
OpenTelemetry project's own protobuf definitions (the `opentelemetry-proto`
package from PyPI), not with egret's code.

  otlp_receiver.py HOST PORT OUT [--tls CERT KEY] [--answers CODE,CODE,...]

Serves POST on any path over HTTP (or HTTPS with --tls), gunzips a body sent
with Content-Encoding: gzip, decodes it as an ExportLogsServiceRequest and
appends one JSON object per request to OUT: path, headers, the status it
answered, the resource attributes and the log records (attribute values with
their OTLP types: int, double, bool, string, array, kvlist). The n-th request
is answered --answers' n-th code (503 and 429 with Retry-After: 1), then 200
with an empty ExportLogsServiceResponse. Prints "listening" once ready.
"""
import gzip
import http.server
import json
import ssl
import sys
import threading
import time

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

LOCK = threading.Lock()


def value(v):
    """An AnyValue as JSON, keeping its type ("int" stays a number)."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return {"bytes": v.bytes_value.hex()}
    return None


def attributes(kvs):
    out = {}
    for kv in kvs:
        if kv.key in out:
            out.setdefault("__duplicates__", []).append(kv.key)
        out[kv.key] = value(kv.value)
    return out


def decode(body):
    req = logs_service_pb2.ExportLogsServiceRequest()
    req.ParseFromString(body)
    resources = []
    for rl in req.resource_logs:
        scopes = []
        for sl in rl.scope_logs:
            scopes.append({
                "scope": {"name": sl.scope.name, "version": sl.scope.version},
                "records": [{
                    "time_unix_nano": r.time_unix_nano,
                    "observed_time_unix_nano": r.observed_time_unix_nano,
                    "severity_number": r.severity_number,
                    "severity_text": r.severity_text,
                    "body": value(r.body),
                    "attributes": attributes(r.attributes),
                } for r in sl.log_records],
            })
        resources.append({"resource": attributes(rl.resource.attributes), "scopes": scopes})
    return resources


def main():
    host, port, out = sys.argv[1:4]
    rest = sys.argv[4:]
    tls, answers = None, []
    while rest:
        if rest[0] == "--tls":
            tls, rest = (rest[1], rest[2]), rest[3:]
        elif rest[0] == "--answers":
            answers, rest = [int(c) for c in rest[1].split(",")], rest[2:]
        else:
            sys.exit(f"unknown argument {rest[0]}")
    count = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with LOCK:
                n = count[0]
                count[0] += 1
            status = answers[n] if n < len(answers) else 200
            entry = {
                "n": n,
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "content_encoding": self.headers.get("Content-Encoding"),
                "user_agent": self.headers.get("User-Agent"),
                "authorization": self.headers.get("Authorization"),
                "received_at": time.time(),
                "answered": status,
            }
            try:
                body = raw
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(raw)
                entry["resource_logs"] = decode(body)
            except Exception as e:  # recorded, for the test to show
                entry["error"] = repr(e)
            with LOCK, open(out, "a") as f:
                f.write(json.dumps(entry) + "\n")
            reply = b""
            if status == 200:
                reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
            self.send_response(status)
            if status in (429, 503):
                self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("listening", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
