-- wrk script: POST the JSON bodies in $WRK_BODY_FILE, one per line (GET when unset); with
-- several bodies each connection cycles through them. Prints one machine-readable summary
-- line (with p95, which wrk's own report lacks).
local path = os.getenv("WRK_BODY_FILE")
local bodies = {}
if path and path ~= "" then
  local f = assert(io.open(path, "rb"))
  for line in f:lines() do
    if #line > 0 then table.insert(bodies, line) end
  end
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = bodies[1]
end

local i = 0
if #bodies > 1 then
  function request()
    i = i % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[i])
  end
end

function done(summary, latency, requests)
  local s = summary
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, ' ..
    '"p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f}\n',
    s.requests, s.duration, s.errors.status,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
