#!/usr/bin/env python3
"""Sends pre-generated requests one by one and checks each answer is 2xx.

usage: send.py BASE_URL CA_CERT FILE
FILE lines: METHOD<TAB>PATH<TAB>BODY (gen_direct.py) or
            REQUEST_ID<TAB>TIMESTAMP<TAB>SIGNATURE<TAB>BODY with PATH_ set (gen_signed.py).
"""
import os, ssl, sys, urllib.request

base, ca, path = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
n = 0
for line in open(path):
    parts = line.rstrip("\n").split("\t")
    if len(parts) == 4:
        rid, ts, sig, body = parts
        req = urllib.request.Request(base + os.environ["PATH_"], data=body.encode(), method="POST", headers={
            "Content-Type": "application/json", "X-TokenVault-Signature": sig,
            "X-TokenVault-Timestamp": ts, "X-TokenVault-Request-Id": rid})
    else:
        method, p, body = parts
        req = urllib.request.Request(base + p, data=body.encode() if body else None, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx) as r:
        assert 200 <= r.status < 300, r.status
    n += 1
print(f"sent {n}", file=sys.stderr)
