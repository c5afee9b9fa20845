-- cache_peek: is there a negative entry (a cached "not found" or failure) for this key?
-- Positive entries are not sent back: they are only needed when the downstream fails.
-- KEYS[1] fallback entry hash
-- Returns {} or {kind, value_json}
local rec = redis.call('HMGET', KEYS[1], 'kind', 'value')
if rec[1] == 'negative' or rec[1] == 'failure' then
  return {rec[1], rec[2]}
end
return {}
