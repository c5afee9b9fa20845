--@include _prelude.lua
-- cache_put: remember a validated success, a negative answer, or a recent failure.
-- A failure is kept beside the last known good value, never instead of it: the value is
-- what the next failing calls should be served.
-- KEYS[1] fallback entry hash
-- ARGV: value, now_ms (0 = TIME), ttl_ms, kind ('ok' | 'negative' | 'failure')
-- Returns 1.
local key = KEYS[1]
local now = clock_ms(ARGV[2])
local ttl = math.max(1, tonumber(ARGV[3]))
if ARGV[4] == 'failure' then
  redis.call('HSET', key, 'fail_value', ARGV[1], 'fail_until', now + ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
  return 1
end
-- A value replaces the whole entry: every field is written (fail_until 0: no failure, in
-- the words every version of cache_get reads), so no DEL is needed first.
redis.call('HSET', key, 'value', ARGV[1], 'written_at', now, 'kind', ARGV[4], 'fail_value', '', 'fail_until', 0)
redis.call('PEXPIRE', key, ttl)
return 1
