-- cache_put: remember a validated success (or a negative answer) for a fallback key.
-- KEYS[1] fallback entry hash
-- ARGV: value_json, now_ms (0 = TIME), ttl_ms, kind ('ok' | 'negative' | 'failure')
-- Returns 1.
local key = KEYS[1]
local now = clock_ms(ARGV[2])
redis.call('DEL', key)
redis.call('HSET', key, 'value', ARGV[1], 'written_at', now, 'kind', ARGV[4])
redis.call('PEXPIRE', key, math.max(1, tonumber(ARGV[3])))
return 1
