-- wrk script: authenticated single-case submissions that wait for their result (POST ?wait=).
-- BENCH_TOKEN and BENCH_BODY (a file) come from tests/bench/run.sh.
local token = os.getenv("BENCH_TOKEN")
local file = assert(io.open(os.getenv("BENCH_BODY"), "r"))
local body = file:read("*a")
file:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token

-- No response() callback: with one, wrk hands every response's headers and body to Lua, about
-- 6 of its 24 µs of CPU per request on the two cores it shares with onkos and Postgres
-- (BENCHMARKS.md, 2026-12-02, later). wrk counts error answers itself (non_2xx: status >= 400),
-- which are not counted as completed; run.sh checks that every stored analysis succeeded.

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  io.write(string.format("RESULT completed_per_s=%.1f p50_ms=%.2f p99_ms=%.2f requests=%d non_2xx=%d socket_errors=%d\n",
    (summary.requests - summary.errors.status) / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
