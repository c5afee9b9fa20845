-- cache_get: what a fallback entry holds for this call.
-- Always: a cached negative answer, or a failure of this key remembered moments ago.
-- With serve: also the last known good value, while its age is under
-- max(floor, ttl * decay^n), n being the downstream's consecutive failures now, and under
-- max_stale; serving shortens the entry's remaining life to that bound, so a long outage
-- drains stale data.
-- KEYS[1] fallback entry hash
-- ARGV: now_ms (0 = TIME), serve (1|0), n, ttl_ms, decay, floor_ms, max_stale_ms (0 = none)
-- Returns {} | {'negative', value} | {'failure', failure_text}
--       | {'ok', value, age_ms, allowed_ms, failure_text or nil}
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'kind', 'value', 'written_at', 'fail_until', 'fail_value')
if rec[1] == 'negative' then
  return {'negative', rec[2]}
end
local serve = ARGV[2] == '1' and rec[1] == 'ok'
if not (serve or rec[4]) then
  return {} -- nothing to tell: no clock read
end
local now = clock_ms(ARGV[1])
local failure = false
if rec[4] and tonumber(rec[4]) > now then
  failure = rec[5]
end
if serve then
  local age = now - tonumber(rec[3])
  local allowed = math.max(tonumber(ARGV[6]), math.floor(tonumber(ARGV[4]) * tonumber(ARGV[5]) ^ tonumber(ARGV[3])))
  local max_stale = tonumber(ARGV[7])
  if max_stale > 0 and max_stale < allowed then allowed = max_stale end
  if age < allowed then
    local remaining = allowed - age
    local pttl = redis.call('PTTL', key)
    if pttl < 0 or remaining < pttl then
      redis.call('PEXPIRE', key, remaining)
    end
    return {'ok', rec[2], age, allowed, failure}
  end
  if failure then
    -- too old to serve, but the failure beside it is still news
    redis.call('HDEL', key, 'kind', 'value', 'written_at')
  else
    redis.call('DEL', key)
  end
end
if failure then
  return {'failure', failure}
end
return {}
