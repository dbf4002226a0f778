#!/usr/bin/env python3
"""Pre-generates single-use direct-access requests for wrk (stdlib only).

usage: gen_direct.py SECRET_B64 KIND N OUT [SERVICES]
KIND: store | credential | totp (GET /v1/totp-code on services totp-0..). Each line of OUT: METHOD<TAB>PATH<TAB>BODY.
Every request carries its own ticket (fresh nonce, iat=now, exp=now+240).
"""
import base64, hashlib, hmac, json, os, sys, time

secret = base64.b64decode(sys.argv[1])
kind, n, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
services = int(sys.argv[5]) if len(sys.argv) > 5 else 200
now = int(time.time())

def ticket(pur, svc):
    claims = {"sub": "bench", "svc": svc, "pur": pur, "iat": now, "exp": now + 240, "nonce": os.urandom(16).hex()}
    p = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return p + "." + hmac.new(secret, p.encode(), hashlib.sha256).hexdigest()

with open(out, "w") as f:
    for i in range(n):
        svc = f"svc-{i % services}"
        if kind == "store":
            body = json.dumps({"ticket": ticket("store", svc), "service": svc,
                               "tokenData": {"accessToken": "ghp_" + os.urandom(12).hex(), "tokenType": "PlainText"}},
                              separators=(",", ":"))
            f.write(f"POST\t/v1/store\t{body}\n")
        elif kind == "totp":
            svc = f"totp-{i % services}"
            f.write(f"GET\t/v1/totp-code?ticket={ticket('totp_code', svc)}&service={svc}\t\n")
        elif kind == "totp-store":
            svc = f"totp-{i % services}"
            body = json.dumps({"ticket": ticket("store", svc), "service": svc,
                               "tokenData": {"totpSecret": base64.b32encode(os.urandom(20)).decode()}},
                              separators=(",", ":"))
            f.write(f"POST\t/v1/store\t{body}\n")
        else:
            f.write(f"GET\t/v1/credential?ticket={ticket('agent_credential', svc)}&service={svc}\t\n")
