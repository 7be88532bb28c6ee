-- wrk script: POSTs one image as multipart/form-data and records, per status class, the
-- latency of every response. Run with as many threads as connections (-t N -c N), so each
-- thread's single connection answers its requests in order and a request's latency is the
-- time from its request() to its response().
-- Environment: BENCH_IMAGE (file to upload), BENCH_PATH (default /predict), BENCH_STORM:
-- unset, a refused connection waits the Retry-After the server sent (as HTTP clients that
-- retry do, e.g. urllib3's Retry), so the load generator does not flood the 2 cores it
-- shares with the server; "1", it re-sends at once (wrk's own behaviour: a refusal storm).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } vs_timespec;
int clock_gettime(int clk_id, vs_timespec *tp);
]]
local ts = ffi.new("vs_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local req
local sent_at = 0
local backoff_ms = 0  -- wait before this connection's next request (one connection per thread)
local storm = os.getenv("BENCH_STORM") == "1"
ok_lat = {}      -- latencies (us) of 2xx responses
other = {}       -- count by status for everything else
n_ok = 0

function init(args)
  local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
  local img = f:read("*all")
  f:close()
  local boundary = "----visionservebench7d1f"
  local path = os.getenv("BENCH_PATH") or "/predict"
  local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
  local body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image.jpg\"\r\n"
    .. "Content-Type: image/jpeg\r\n\r\n" .. img .. "\r\n--" .. boundary .. "--\r\n"
  -- Built once: formatting a 160 kB request per call would cost the load generator more
  -- CPU than the server spends refusing it.
  req = wrk.format("POST", path, headers, body)
end

function delay()
  local ms = backoff_ms
  backoff_ms = 0
  return ms
end

function request()
  sent_at = now_us()
  return req
end

function response(status, hdrs, resp)
  local lat = now_us() - sent_at
  if status >= 200 and status < 300 then
    n_ok = n_ok + 1
    ok_lat[n_ok] = lat
  else
    other[status] = (other[status] or 0) + 1
    if status == 503 and not storm then
      local after = tonumber(hdrs["retry-after"] or hdrs["Retry-After"] or "")
      if after then backoff_ms = after * 1000 end
    end
  end
end

function done(summary, latency, requests)
  local all = {}
  local statuses = {}
  for _, t in ipairs(threads) do
    local lats = t:get("ok_lat")
    for _, v in ipairs(lats) do all[#all + 1] = v end
    for s, c in pairs(t:get("other")) do statuses[s] = (statuses[s] or 0) + c end
  end
  table.sort(all)
  local function pct(p)
    if #all == 0 then return -1 end
    local i = math.max(1, math.ceil(#all * p / 100))
    return all[i] / 1000
  end
  local parts = {}
  for s, c in pairs(statuses) do parts[#parts + 1] = string.format("\"%d\": %d", s, c) end
  io.write(string.format(
    "BENCH_JSON {\"requests\": %d, \"ok\": %d, \"duration_s\": %.3f, \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, "
      .. "\"max_ms\": %.3f, \"other_status\": {%s}, \"socket_errors\": {\"connect\": %d, \"read\": %d, \"write\": %d, \"timeout\": %d}}\n",
    summary.requests, #all, summary.duration / 1e6, pct(50), pct(90), pct(99), pct(100), table.concat(parts, ", "),
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
