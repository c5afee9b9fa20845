-- set_switch: an operator's degrade switch for one downstream, read by every admission.
-- KEYS[1] breaker hash
-- ARGV: mode ('normal' | 'fallback_only' | 'reject' | 'breaker_disabled' | 'forced_open'
--       | 'forced_closed' | 'close' | 'reset'), name, now_ms (0 = TIME), ttl_ms,
--       source ('cli' | 'file')
-- A 'file' switch applies only when the file's value changed since it was last applied,
-- so a fleet of workers re-reading one file never undoes an operator's later command.
-- Returns {previous mode, applied (1|0)}.
local key = KEYS[1]
local now = clock_ms(ARGV[3])
local mode, source = ARGV[1], ARGV[5]
local previous = redis.call('HGET', key, 'switch') or 'normal'
if source == 'file' then
  if redis.call('HGET', key, 'file_switch') == mode then
    return {previous, 0}
  end
  redis.call('HSET', key, 'file_switch', mode)
end
if mode == 'reset' then
  redis.call('DEL', key)
  redis.call('HSET', key, 'name', ARGV[2], 'state', 'closed', 'changed_at', now)
elseif mode == 'close' then
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 2) == 'p:' then redis.call('HDEL', key, f) end
  end
  redis.call('HSET', key, 'name', ARGV[2], 'switch', 'normal', 'state', 'closed', 'changed_at', now,
             'open_count', 0, 'ho_ok', 0, 'consec', 0, 'switched_at', now)
  redis.call('HINCRBY', key, 'transitions', 1)
else
  redis.call('HSET', key, 'name', ARGV[2], 'switch', mode, 'switched_at', now)
  if redis.call('HEXISTS', key, 'state') == 0 then
    redis.call('HSET', key, 'state', 'closed', 'changed_at', now)
  end
end
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return {previous, 1}
