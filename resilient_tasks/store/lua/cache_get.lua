--@include _prelude.lua
-- cache_get: what a fallback entry holds for this call.
-- Always: a cached negative answer, or a failure of this key remembered moments ago, and
-- the age of the last known good value the entry holds (so a caller can skip rewriting
-- an entry that is still fresh).
-- With serve: also that value, while its age is under max(floor, ttl * decay^n), n being
-- the downstream's consecutive failures now, and under max_stale; serving shortens the
-- entry's remaining life to that bound, so a long outage drains stale data. A value too
-- old to serve is dropped (its age is then told as -1: none).
-- KEYS[1] fallback entry hash
-- ARGV: now_ms (0 = TIME), serve (1|0), n, ttl_ms, decay, floor_ms, max_stale_ms (0 = none)
-- Returns {} | {'', good_age_ms} | {'negative', value} | {'failure', failure_text, good_age_ms}
--       | {'ok', value, age_ms, allowed_ms, failure_text or nil, good_age_ms}
-- (good_age_ms: -1 when no good value is held)
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'kind', 'value', 'written_at', 'fail_until', 'fail_value')
if rec[1] == 'negative' then
  return {'negative', rec[2]}
end
local good = rec[1] == 'ok'
local fail_until = tonumber(rec[4]) -- (0 beside a value written since: no failure)
if not (good or (fail_until and fail_until > 0)) then
  return {} -- nothing to tell: no clock read
end
local now = clock_ms(ARGV[1])
local failure = false
if fail_until and fail_until > now then
  failure = rec[5]
end
local good_age = -1
if good then
  local age = now - tonumber(rec[3])
  good_age = math.max(0, age)
  if ARGV[2] == '1' then
    local allowed = math.max(tonumber(ARGV[6]), math.floor(tonumber(ARGV[4]) * tonumber(ARGV[5]) ^ tonumber(ARGV[3])))
    local max_stale = tonumber(ARGV[7])
    if max_stale > 0 and max_stale < allowed then allowed = max_stale end
    if age < allowed then
      local remaining = allowed - age
      local pttl = redis.call('PTTL', key)
      if pttl < 0 or remaining < pttl then
        redis.call('PEXPIRE', key, remaining)
      end
      return {'ok', rec[2], age, allowed, failure, good_age}
    end
    good_age = -1
    if failure then
      -- too old to serve, but the failure beside it is still news
      redis.call('HDEL', key, 'kind', 'value', 'written_at')
    else
      redis.call('DEL', key)
    end
  end
end
if failure then
  return {'failure', failure, good_age}
end
if good_age >= 0 then
  return {'', good_age}
end
return {}
