#!/usr/bin/env python3
"""Floods for egret's flood tests and bench/flood.sh: bounded in count and time,
loopback or the test namespace's own addresses only.

  dns SERVER PORT N [WINDOW] [PREFIX]
      N queries (type A) for N unique names PREFIX<i>.flood.test, at most WINDOW
      (default 256) unanswered at a time so the guard's socket never overflows;
      prints "sent S answered A refused R" (stops after 5 s without an answer).
  udp HOST N
      datagrams to N distinct ports of HOST (1..N): the first half as fast as
      possible, then print "half" and go on one every 10 ms until a line arrives
      on stdin (at most N/2 - 1 of them), then the rest as fast as possible;
      prints "done S" with S the sends the firewall refused (EPERM).
  udp-one HOST PORT
      one datagram; prints "refused" if the firewall refused it.
  udp-uids HOST FIRST_UID UIDS PER_UID
      (as root) for each of UIDS uids from FIRST_UID, a child that drops to
      that uid and sends one datagram to each of PER_UID ports of HOST: that
      many distinct identities, each within its own rate. Prints the sends.
  udp-hold HOST FIRST_PORT N
      one datagram to each of ports FIRST_PORT.. FIRST_PORT+N-1 of HOST from
      one socket; prints "sent R" (R refused by the firewall), then keeps the
      socket (so the process can be found) until stdin closes, at most 120 s.
      Run under many program names (hard links of python3), it is one account
      posing as many identities.
"""
import errno
import os
import select
import socket
import struct
import sys
import time


def query(qid, name):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\x00" + struct.pack(">HH", 1, 1)


def dns(server, port, n, window=256, prefix="n"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    addr = (server, port)
    sent = answered = refused = 0
    outstanding = set()
    quiet_since = time.monotonic()
    while sent < n or outstanding:
        while sent < n and len(outstanding) < window:
            qid = sent % 65536
            try:
                s.sendto(query(qid, f"{prefix}{sent}.flood.test"), addr)
            except (BlockingIOError, ConnectionRefusedError):
                break
            outstanding.add(qid)
            sent += 1
        r, _, _ = select.select([s], [], [], 0.5)
        if not r:
            if time.monotonic() - quiet_since > 5:
                break
            continue
        while True:
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # The guard is gone (egret stopped): nothing more will answer.
                continue
            if len(data) < 12:
                continue
            qid, flags = struct.unpack(">HH", data[:4])
            if qid in outstanding:
                outstanding.discard(qid)
                answered += 1
                refused += (flags & 0xF) == 5
                quiet_since = time.monotonic()
    print(f"sent {sent} answered {answered} refused {refused}", flush=True)


def udp(host, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    refused = 0
    port = 0

    def send():
        nonlocal refused, port
        port += 1
        try:
            s.sendto(b"x", (host, port))
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            refused += 1

    half = n // 2
    while port < half:
        send()
    print("half", flush=True)
    while port < n - 1:
        r, _, _ = select.select([sys.stdin], [], [], 0.01)
        if r:
            sys.stdin.readline()
            break
        send()
    while port < n:
        send()
    print(f"done {refused}", flush=True)


def udp_one(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (host, port))
        print("sent", flush=True)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        print("refused", flush=True)


def udp_uids(host, first, uids, per_uid):
    for uid in range(first, first + uids):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for port in range(1, per_uid + 1):
                    try:
                        s.sendto(b"x", (host, port))
                    except OSError:
                        pass
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    print(uids * per_uid, flush=True)


def udp_hold(host, first, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    refused = 0
    for port in range(first, first + n):
        try:
            s.sendto(b"x", (host, port))
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            refused += 1
    print(f"sent {refused}", flush=True)
    select.select([sys.stdin], [], [], 120)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "dns":
        dns(args[0], int(args[1]), int(args[2]),
            int(args[3]) if len(args) > 3 else 256,
            args[4] if len(args) > 4 else "n")
    elif cmd == "udp":
        udp(args[0], int(args[1]))
    elif cmd == "udp-uids":
        udp_uids(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "udp-hold":
        udp_hold(args[0], int(args[1]), int(args[2]))
    elif cmd == "udp-one":
        udp_one(args[0], int(args[1]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
