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

-- drop_probes: forget every half-open probe lease (fields p:<owner>).
local function drop_probes(key)
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 2) == 'p:' then redis.call('HDEL', key, f) end
  end
end
