-- wrk script for POST /orders at the edge, as clients send them (scripts/bench/orders.py
-- drives it and gives wrk the URL).
-- Environment: TOKEN (a bearer token), DELAY_MS (each connection's pause before a request:
-- connections / rate × 1000 paces the run at about that rate; 0 = as fast as the API
-- answers), IDEMPOTENCY (1 = a fresh Idempotency-Key on every request).
-- Prints one JSON line with the counts and latency percentiles when done.
local token, pause = os.getenv("TOKEN"), tonumber(os.getenv("DELAY_MS") or "0")
local idempotency = os.getenv("IDEMPOTENCY") == "1"
local kinds = {"priority", "regular", "digital"}
local sent, threads = 0, 0

function setup(thread)  -- runs in the main state: give each thread its own id for the keys
  threads = threads + 1
  thread:set("id", threads)
end

function delay()
  return pause
end

function request()
  sent = sent + 1
  local headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  if idempotency then headers["Idempotency-Key"] = string.format("bench-%d-%d-%d", os.time(), id, sent) end
  local body = string.format('{"customer": {"id": "c-%d", "name": "Bench"}, "type": "%s", ' ..
    '"items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]}',
    sent % 500, kinds[sent % 3 + 1])
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_s": %.3f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
