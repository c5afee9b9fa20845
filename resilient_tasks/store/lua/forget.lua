-- forget: drop an idempotency record (an operator's action); keeps nothing.
-- KEYS[1] record (a string, or a hash written by an earlier release)
-- Returns 1 when a record was removed.
return redis.call('DEL', KEYS[1])
