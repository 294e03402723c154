-- wrk script: POST the JSON bodies in $WRK_BODY_FILE, one per line (GET when unset); with
-- several bodies each connection cycles through them. Prints one machine-readable summary
-- line (with p95, which wrk's own report lacks). With WRK_COUNT_STATUSES=1 it also counts
-- the answers by status (a response hook, which costs wrk some of its own speed).
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

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local counting = os.getenv("WRK_COUNT_STATUSES") == "1"
statuses = {}
if counting then
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local s = summary
  local parts = {}
  if counting then
    local tally = {}
    for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
        tally[status] = (tally[status] or 0) + n
      end
    end
    for status, n in pairs(tally) do
      table.insert(parts, string.format('"%d": %d', status, n))
    end
  end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, ' ..
    '"p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "statuses": {%s}}\n',
    s.requests, s.duration, s.errors.status,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    table.concat(parts, ", ")))
end
