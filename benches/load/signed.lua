-- wrk script: each request is a pre-signed, single-use line of $REQS.
-- Every thread reads the whole file and takes every k-th line (k = threads),
-- so no request id is sent twice.
local threads = {}
local counter = 0
function setup(thread)
  thread:set("id", counter + tonumber(os.getenv("WRK_ID_BASE") or "0"))
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "2")
  reqs = {}
  local i = 0
  for line in io.lines(os.getenv("REQS")) do
    if i % nthreads == id then
      local rid, ts, sig, body = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)")
      table.insert(reqs, wrk.format("POST", os.getenv("PATH_"), {
        ["Content-Type"] = "application/json",
        ["X-TokenVault-Signature"] = sig,
        ["X-TokenVault-Timestamp"] = ts,
        ["X-TokenVault-Request-Id"] = rid,
      }, body))
    end
    i = i + 1
  end
  n = 0
end
function request()
  n = n + 1
  if n > #reqs then
    wrk.thread:stop()
    n = #reqs
  end
  return reqs[n]
end
function done(summary, latency, requests)
  io.write(string.format("non2xx=%d\n", summary.errors.status))
end
