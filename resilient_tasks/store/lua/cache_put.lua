-- cache_put: remember a validated success, a negative answer, or a recent failure.
-- A failure is kept beside the last known good value, never instead of it: the value is
-- what the next failing calls should be served.
-- KEYS[1] fallback entry hash
-- ARGV: value, now_ms (0 = TIME), ttl_ms (at least 1), kind ('ok' | 'negative' | 'failure')
-- Returns 1.
-- Numbers are written as the caller sent them: a value's write reads no clock (workers
-- send theirs) and converts nothing.
local key, now = KEYS[1], ARGV[2]
if now == '0' then
  --@include _prelude.lua
  now = clock_ms(now)
end
if ARGV[4] == 'failure' then
  local ttl = tonumber(ARGV[3])
  redis.call('HSET', key, 'fail_value', ARGV[1], 'fail_until', tonumber(now) + ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
  return 1
end
-- A value replaces the whole entry: every field is written (fail_until 0: no failure, in
-- the words every version of cache_get reads), so no DEL is needed first.
redis.call('HSET', key, 'value', ARGV[1], 'written_at', now, 'kind', ARGV[4], 'fail_value', '', 'fail_until', '0')
redis.call('PEXPIRE', key, ARGV[3])
return 1
