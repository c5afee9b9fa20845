-- Shared by every script (prepended when the scripts are loaded).
-- clock_ms: the caller's clock in ms when it sends one (tests, simulations), else the
-- Redis server's TIME, so a fleet of workers with skewed clocks shares one clock.
local function clock_ms(arg)
  local given = tonumber(arg)
  if given and given ~= 0 then
    return given
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A breaker's sliding window is nb buckets of window/nb ms in its hash: fields t<slot>
-- (the bucket's interval), c/f/s (calls, failures, slow), a (first attempts), r (retries).
-- bucket_of: the current interval index and its slot.
local function bucket_of(now, window, nb)
  local idx = math.floor(now / math.max(1, math.floor(window / nb)))
  return idx, idx % nb
end

-- touch_bucket: empty a slot that still holds an older interval, before counting in it.
local function touch_bucket(key, idx, slot)
  if tonumber(redis.call('HGET', key, 't' .. slot) or '-1') ~= idx then
    redis.call('HSET', key, 't' .. slot, idx, 'c' .. slot, 0, 'f' .. slot, 0, 's' .. slot, 0,
               'a' .. slot, 0, 'r' .. slot, 0)
  end
end
