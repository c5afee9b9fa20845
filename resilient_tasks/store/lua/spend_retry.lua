--@include _prelude.lua
-- spend_retry: take one retry from the downstream's fleet-wide budget, if any is left.
-- Retries in the window may not exceed ratio * first attempts + min_per_window.
-- KEYS[1] breaker hash (the budget lives beside the breaker's window)
-- ARGV: now_ms (0 = TIME), ratio, min_per_window, window_ms, buckets, name, ttl_ms
-- Returns {granted (1|0), retries_in_window, first_attempts_in_window}
local key = KEYS[1]
local now = clock_ms(ARGV[1])
local ratio, floor_n = tonumber(ARGV[2]), tonumber(ARGV[3])
local window, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
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
local granted = retries + 1 <= ratio * attempts + floor_n
local fields = {'name', ARGV[6], 'budget_ratio', ARGV[2], 'budget_min', ARGV[3]}
if granted then
  if tonumber(values[slot * 3 + 1] or '-1') == idx then
    fields[7], fields[8] = 'r' .. slot, (tonumber(values[slot * 3 + 3]) or 0) + 1
  else -- the slot held an older interval: it starts again with this retry
    for i, v in ipairs({'t' .. slot, idx, 'c' .. slot, 0, 'f' .. slot, 0, 's' .. slot, 0,
                        'a' .. slot, 0, 'r' .. slot, 1}) do
      fields[6 + i] = v
    end
  end
end
redis.call('HSET', key, unpack(fields))
redis.call('PEXPIRE', key, tonumber(ARGV[7]))
if granted then
  return {1, retries + 1, attempts}
end
return {0, retries, attempts}
