--@include _prelude.lua
-- switch: an operator's degrade switch for one downstream, read by every admission, or
-- the 'close' / 'reset' action.
-- KEYS[1] breaker hash
-- ARGV: mode ('normal' | 'fallback_only' | 'reject' | 'breaker_disabled' | 'forced_open'
--       | 'forced_closed' | 'close' | 'reset'), name, now_ms (0 = TIME), ttl_ms,
--       source ('cli' | 'file')
-- A 'file' switch applies only when the file's value changed since it was last applied,
-- so a fleet of workers re-reading one file never undoes an operator's later command
-- (the file's last value survives a reset for the same reason).
-- Returns {previous switch, applied (1|0)}: the switch in force before this call, for
-- 'close' and 'reset' too.
local key = KEYS[1]
local mode, source = ARGV[1], ARGV[5]
local rec = redis.call('HMGET', key, 'switch', 'file_switch', 'state')
local previous, file_switch = rec[1] or 'normal', rec[2]
if source == 'file' then
  if file_switch == mode then
    return {previous, 0}
  end
  file_switch = mode
end
local now = clock_ms(ARGV[3])
if mode == 'reset' then
  redis.call('DEL', key)
  redis.call('HSET', key, 'name', ARGV[2], 'state', 'closed', 'changed_at', now)
elseif mode == 'close' then
  drop_probes(key)
  redis.call('HSET', key, 'name', ARGV[2], 'switch', 'normal', 'state', 'closed', 'changed_at', now,
             'open_count', 0, 'ho_ok', 0, 'consec', 0, 'switched_at', now)
  redis.call('HINCRBY', key, 'transitions', 1)
else
  if rec[3] then
    redis.call('HSET', key, 'name', ARGV[2], 'switch', mode, 'switched_at', now)
  else
    redis.call('HSET', key, 'name', ARGV[2], 'switch', mode, 'switched_at', now, 'state', 'closed', 'changed_at', now)
  end
end
if file_switch then
  redis.call('HSET', key, 'file_switch', file_switch)
end
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return {previous, 1}
