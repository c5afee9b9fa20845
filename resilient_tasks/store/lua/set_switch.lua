-- set_switch: an operator's degrade switch for one downstream, read by every admission.
-- KEYS[1] breaker hash
-- ARGV: mode ('normal' | 'fallback_only' | 'reject' | 'breaker_disabled' | 'forced_open'
--       | 'forced_closed' | 'reset'), name, now_ms (0 = TIME), ttl_ms
-- Returns the previous mode.
local key = KEYS[1]
local now = tonumber(ARGV[3])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local previous = redis.call('HGET', key, 'switch') or 'normal'
if ARGV[1] == 'reset' then
  redis.call('DEL', key)
  redis.call('HSET', key, 'name', ARGV[2], 'state', 'closed', 'changed_at', now)
else
  redis.call('HSET', key, 'name', ARGV[2], 'switch', ARGV[1], 'switched_at', now)
  if redis.call('HEXISTS', key, 'state') == 0 then
    redis.call('HSET', key, 'state', 'closed', 'changed_at', now)
  end
end
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return previous
