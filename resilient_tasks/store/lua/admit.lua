--@include _prelude.lua
-- admit: may one call go to the downstream? Decides OPEN -> HALF_OPEN by time, and hands
-- out at most `probes` half-open probe leases fleet-wide.
-- KEYS[1] breaker hash
-- ARGV: now_ms (0 = server TIME), owner, probe_lease_ms, half_open_probes, name, ttl_ms
-- Returns {verdict, state, retry_after_ms, consecutive_failures, switch}
--   verdict: 'allow' | 'probe' | 'reject'
local key = KEYS[1]
local owner, lease, probes = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rec = redis.call('HMGET', key, 'state', 'open_until', 'consec', 'switch')
local state = rec[1] or 'closed'
local consec = tonumber(rec[3]) or 0
local switch = rec[4] or 'normal'
-- the clock is read only when needed: a closed breaker's admission is one HMGET
local now = nil
if rec[1] == false then
  now = clock_ms(ARGV[1])
  redis.call('HSET', key, 'name', ARGV[5], 'state', 'closed', 'changed_at', now)
  redis.call('PEXPIRE', key, tonumber(ARGV[6]))
end
if switch == 'breaker_disabled' or switch == 'forced_closed' then
  return {'allow', state, 0, consec, switch}
end
if switch == 'forced_open' or switch == 'fallback_only' or switch == 'reject' then
  return {'reject', state, lease, consec, switch}
end
if state ~= 'closed' then
  now = now or clock_ms(ARGV[1])
end
if state == 'open' then
  local open_until = tonumber(rec[2]) or 0
  if now < open_until then
    return {'reject', state, open_until - now, consec, switch}
  end
  state = 'half_open'
  redis.call('HSET', key, 'state', 'half_open', 'changed_at', now, 'ho_ok', 0)
  redis.call('HINCRBY', key, 'transitions', 1)
  redis.call('PEXPIRE', key, tonumber(ARGV[6]))
end
if state == 'half_open' then
  local live, soonest = 0, nil
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 2) == 'p:' then
      local expiry = tonumber(redis.call('HGET', key, f)) or 0
      if expiry <= now then
        redis.call('HDEL', key, f)
      else
        live = live + 1
        if soonest == nil or expiry < soonest then soonest = expiry end
      end
    end
  end
  if live < probes then
    redis.call('HSET', key, 'p:' .. owner, now + lease)
    return {'probe', state, 0, consec, switch}
  end
  return {'reject', state, (soonest or now) - now, consec, switch}
end
return {'allow', state, 0, consec, switch}
