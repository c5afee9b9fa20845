-- cache_serve: the last known good value, if it is still trusted.
-- An entry may be served while its age is under max(floor, ttl * decay^n), n being the
-- downstream's consecutive failures now, and under max_stale; each serve shortens the
-- entry's remaining life to that bound, so a long outage drains stale data.
-- KEYS[1] fallback entry hash
-- ARGV: now_ms (0 = TIME), n, ttl_ms, decay, floor_ms, max_stale_ms (0 = none)
-- Returns {} or {value_json, age_ms, allowed_ms}
local key = KEYS[1]
local now = clock_ms(ARGV[1])
local rec = redis.call('HMGET', key, 'value', 'written_at', 'kind')
if rec[1] == false or rec[3] ~= 'ok' then
  return {}
end
local age = now - tonumber(rec[2])
local allowed = math.max(tonumber(ARGV[5]), math.floor(tonumber(ARGV[3]) * tonumber(ARGV[4]) ^ tonumber(ARGV[2])))
local max_stale = tonumber(ARGV[6])
if max_stale > 0 and max_stale < allowed then allowed = max_stale end
if age >= allowed then
  redis.call('DEL', key)
  return {}
end
local remaining = allowed - age
local pttl = redis.call('PTTL', key)
if pttl < 0 or remaining < pttl then
  redis.call('PEXPIRE', key, remaining)
end
return {rec[1], age, allowed}
