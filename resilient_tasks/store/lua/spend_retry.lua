-- spend_retry: take one retry from the downstream's fleet-wide budget, if any is left.
-- Retries in the window may not exceed ratio * first attempts + min_per_window.
-- KEYS[1] breaker hash (the budget lives beside the breaker's window)
-- ARGV: now_ms (0 = TIME), ratio, min_per_window, window_ms, buckets, ttl_ms
-- Returns {granted (1|0), retries_in_window, first_attempts_in_window}
local key = KEYS[1]
local now = clock_ms(ARGV[1])
local ratio, floor_n = tonumber(ARGV[2]), tonumber(ARGV[3])
local window, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', key, 'budget_ratio', ARGV[2], 'budget_min', ARGV[3])
local idx, slot = bucket_of(now, window, nb)
local names = {}
for s = 0, nb - 1 do
  names[#names + 1] = 't' .. s
  names[#names + 1] = 'a' .. s
  names[#names + 1] = 'r' .. s
end
local values = redis.call('HMGET', key, unpack(names))
local attempts, retries = 0, 0
for s = 0, nb - 1 do
  local t = tonumber(values[s * 3 + 1] or '-1') or -1
  if t > idx - nb then
    attempts = attempts + (tonumber(values[s * 3 + 2]) or 0)
    retries = retries + (tonumber(values[s * 3 + 3]) or 0)
  end
end
if retries + 1 > ratio * attempts + floor_n then
  return {0, retries, attempts}
end
touch_bucket(key, idx, slot)
redis.call('HINCRBY', key, 'r' .. slot, 1)
redis.call('PEXPIRE', key, tonumber(ARGV[6]))
return {1, retries + 1, attempts}
