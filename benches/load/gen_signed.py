#!/usr/bin/env python3
"""Pre-signs N single-use Token Vault requests for wrk (stdlib only).

usage: gen_signed.py SECRET_B64 PATH BODY_JSON N OUT
Each line of OUT: request-id<TAB>timestamp<TAB>signature<TAB>body. Timestamps
are 'now', so run wrk within 5 minutes.
"""
import base64, hashlib, hmac, json, os, sys, time

secret = base64.b64decode(sys.argv[1])
path, body_tmpl, n, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ts = str(int(time.time()))
with open(out, "w") as f:
    for i in range(n):
        rid = "req_" + os.urandom(6).hex()
        body = json.dumps(json.loads(body_tmpl.replace("{i}", str(i))), separators=(",", ":"))
        sig = hmac.new(secret, (ts + "." + body).encode(), hashlib.sha256).hexdigest()
        f.write(f"{rid}\t{ts}\tsha256={sig}\t{body}\n")
