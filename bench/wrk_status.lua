-- wrk script: POST the JSON bodies in $WRK_BODY_FILE (one per line, each connection cycling
-- through them) and count responses by status. A closed loop: each connection sends its next
-- request the moment an answer comes back, so a 429 is retried at once.
local path = assert(os.getenv("WRK_BODY_FILE"))
local bodies = {}
local f = assert(io.open(path, "rb"))
for line in f:lines() do
  if #line > 0 then table.insert(bodies, line) end
end
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local i = 0
statuses = {}
function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local tally = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      tally[status] = (tally[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(tally) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  io.write(string.format('WRKJSON {"duration_us": %d, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f, ' ..
    '"statuses": {%s}}\n', summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, table.concat(parts, ", ")))
end
