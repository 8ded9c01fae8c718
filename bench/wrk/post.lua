-- POST /v1/chat/completions (non-stream) for wrk; prints one JSON summary line at the end.
-- BENCH_MAX_REQUESTS (optional) stops the thread after that many answers and prints
-- "BENCH_LIMIT" on stderr, on which bench/run.py interrupts wrk (SIGINT ends its -d wait early
-- and still runs done()): a run is bounded in count as well as in time.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"

local limit = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0") or 0
local answered = 0

if limit > 0 then
  function response(status, headers, body)
    answered = answered + 1
    if answered == limit then
      io.stderr:write("BENCH_LIMIT\n")
      io.stderr:flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
