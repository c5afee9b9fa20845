-- epoch: run once per new connection. A Redis that restarted without persistence lost
-- every in-flight claim; the epoch marker tells. It is created when missing; a caller
-- that knew another value (or saw it and finds it gone) declares amnesia: an amnesia
-- marker lives for the window (the longest lease), and claims fail closed meanwhile.
-- KEYS[1] epoch marker, KEYS[2] amnesia marker
-- ARGV: known ('' = never seen), new_value, window_ms, marker_ttl_ms
-- Returns {marker value, detected (1|0), amnesia_remaining_ms, marker_ttl_ms}
local ttl = tonumber(ARGV[4])
local current = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'GET', 'PX', ttl)
if current then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  current = ARGV[2]
end
local detected = 0
if ARGV[1] ~= '' and current ~= ARGV[1] then
  detected = 1
  local window = tonumber(ARGV[3])
  if window > 0 and redis.call('PTTL', KEYS[2]) < window then
    redis.call('SET', KEYS[2], current, 'PX', window)
  end
end
local remaining = redis.call('PTTL', KEYS[2])
if remaining < 0 then remaining = 0 end
return {current, detected, remaining, ttl}
