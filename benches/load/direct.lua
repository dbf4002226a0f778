-- wrk script: pre-generated single-use direct-access requests ($REQS lines:
-- METHOD<TAB>PATH<TAB>BODY). Thread k of n takes lines k, k+n, ...
local counter = 0
function setup(thread)
  thread:set("id", counter + tonumber(os.getenv("WRK_ID_BASE") or "0"))
  counter = counter + 1
end
function init(args)
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "2")
  reqs = {}
  local i = 0
  for line in io.lines(os.getenv("REQS")) do
    if i % nthreads == id then
      local method, path, body = line:match("([^\t]+)\t([^\t]+)\t(.*)")
      local headers = {}
      if body == "" then body = nil else headers["Content-Type"] = "application/json" end
      table.insert(reqs, wrk.format(method, path, headers, body))
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
