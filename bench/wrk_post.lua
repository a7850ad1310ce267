-- wrk script: POST one prebuilt JPEG body (raw image/jpeg, or one multipart 'file' part when
-- BENCH_MULTIPART=1); report percentiles and status errors as JSON at the end.
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local image = f:read("*a")
f:close()
wrk.method = "POST"
if os.getenv("BENCH_MULTIPART") == "1" then
  local boundary = "----imgservebench7d1f"
  wrk.body = "--" .. boundary .. "\r\n" ..
    'Content-Disposition: form-data; name="file"; filename="image.jpg"\r\n' ..
    "Content-Type: image/jpeg\r\n\r\n" .. image .. "\r\n--" .. boundary .. "--\r\n"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
else
  wrk.body = image
  wrk.headers["Content-Type"] = "image/jpeg"
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"tool":"wrk","requests":%d,"duration_s":%.3f,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_ms":%.3f,"p95_ms":%.3f,"p99_ms":%.3f,"mean_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3))
end
