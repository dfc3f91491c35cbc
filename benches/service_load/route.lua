-- wrk script for one route of the clinic service (benches/service_load/run.sh).
-- Arguments (after `--`): ROUTE PREFIX PROVIDERS CASES_PER_PROVIDER TOKENS,
-- where ROUTE is get-one, list-50, create or duplicates, PREFIX is "" (phi's
-- sealed routes) or "/plain" (the plaintext twin) and TOKENS a file with one
-- bearer token per line, provider-0000's first (`clinic-service token`).
local route, prefix, providers, cases
local tokens = {}
local new_case = '{"patient_first":"Aiko","patient_last":"Dubois",'
  .. '"patient_dob":"1960-01-01","ins_provider":"Aetna","procedure_code":"27447","surgery_date":"2026-12-02"}'
local duplicate = '{"patient_last":"Dubois","patient_dob":"1960-01-01"}'
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  route, prefix = args[1], args[2] or ""
  providers, cases = tonumber(args[3]), tonumber(args[4])
  for line in io.lines(args[5]) do
    tokens[#tokens + 1] = line
  end
  math.randomseed(os.time() * 1000 + (seed or 0))
end

-- The headers of a request as a user of provider `p`.
local function as_provider(p)
  return { ["content-type"] = "application/json", ["authorization"] = "Bearer " .. tokens[p + 1] }
end

function request()
  local p = math.random(0, providers - 1)
  if route == "get-one" then
    local n = math.random(0, cases - 1)
    return wrk.format("GET", string.format("%s/cases/provider-%04d-%06d", prefix, p, n), as_provider(p))
  elseif route == "list-50" then
    return wrk.format("GET", string.format("%s/providers/provider-%04d/cases?limit=50", prefix, p), as_provider(p))
  elseif route == "create" then
    return wrk.format("POST", prefix .. "/cases", as_provider(p), new_case)
  else
    return wrk.format("POST", prefix .. "/providers/provider-0042/duplicates", as_provider(42), duplicate)
  end
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
