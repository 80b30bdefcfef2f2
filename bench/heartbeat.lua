-- wrk script: POST /v1/heartbeat for many enrolled devices (tokens from $NEXMDM_TOKENS, one a line).
-- Each wrk thread owns its own share of the devices (device i belongs to thread i mod threads,
-- $NEXMDM_THREADS, default 2) and walks it in order, sending sent_at = now. With enough devices
-- that a device's turns are more than one dedup bucket apart (the bench uses 20,000 devices and
-- 1 s buckets), every request is a new heartbeat, not a retry.
local tokens = {}
for line in io.lines(os.getenv("NEXMDM_TOKENS")) do
  if #line > 0 then tokens[#tokens + 1] = line end
end
local n = 0
local counter = 1
-- thread_id is a global: wrk's thread:set() writes globals, a local would shadow it
thread_id = 0

setup = function(thread)
  thread:set("thread_id", counter)
  counter = counter + 1
end

local threads = tonumber(os.getenv("NEXMDM_THREADS") or "2")

init = function(args)
  n = 0
end

request = function()
  local share = math.floor(#tokens / threads)
  local i = (n % share) * threads + (thread_id - 1) + 1
  n = n + 1
  local sent = os.date("!%Y-%m-%dT%H:%M:%SZ", os.time())
  local body = string.format(
    '{"sent_at":"%s","battery_pct":%d,"charging":%s,"network_type":"wifi","signal_dbm":-%d,' ..
    '"app_version":"4.2.0","os_version":"14","uptime_s":%d,"free_storage_mb":4096}',
    sent, n % 101, (n % 3 == 0) and "true" or "false", 40 + n % 80, 1000 + n)
  return wrk.format("POST", "/v1/heartbeat",
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, body)
end

done = function(summary, latency, requests)
  io.write(string.format("NEXMDM_RESULT requests=%d duration_us=%d errors=%d status_errors=%d p50_us=%d p95_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
