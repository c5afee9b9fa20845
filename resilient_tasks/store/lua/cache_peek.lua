-- cache_peek: a cached "not found", or a failure of this key moments ago?
-- Positive entries are not sent back: they are only needed when the downstream fails.
-- KEYS[1] fallback entry hash
-- ARGV: now_ms (0 = TIME)
-- Returns {} or {kind, value_json}
local rec = redis.call('HMGET', KEYS[1], 'kind', 'value', 'fail_until', 'fail_value')
if rec[1] == 'negative' then
  return {rec[1], rec[2]}
end
if rec[3] and tonumber(rec[3]) > clock_ms(ARGV[1]) then
  return {'failure', rec[4]}
end
return {}
