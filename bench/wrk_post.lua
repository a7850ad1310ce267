-- wrk script: POST one prebuilt JPEG body; report percentiles and status errors as JSON at the end.
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "image/jpeg"

function done(summary, latency, requests)
  io.write(string.format(
    '{"tool":"wrk","requests":%d,"duration_s":%.3f,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_ms":%.3f,"p95_ms":%.3f,"p99_ms":%.3f,"mean_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3))
end
