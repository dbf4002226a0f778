#!/usr/bin/env python3
"""Start-to-READY time of the appliance: exec until it prints its READY line
(TLS, keys, store and sandbox up, listening), N runs, each stopped with
SIGTERM. Usage: start.py N COMMAND... Prints median, p90 and max."""
import os
import signal
import subprocess
import sys
import time

runs, cmd = int(sys.argv[1]), sys.argv[2:]
times = []
for _ in range(runs):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, RUST_LOG="warn"))
    for line in p.stderr:
        if line.startswith(b"READY "):
            times.append((time.monotonic() - t0) * 1000)
            break
    else:
        sys.exit(f"no READY line (exit {p.wait()})")
    p.send_signal(signal.SIGTERM)
    p.stderr.close()
    p.wait()
times.sort()
print(f"start to READY over {runs} runs: median {times[len(times) // 2]:.0f} ms, "
      f"p90 {times[int(len(times) * 0.9) - 1]:.0f} ms, max {times[-1]:.0f} ms")
