-- forget: drop an idempotency record (an operator's action); keeps nothing.
-- KEYS[1] record hash
-- Returns 1 when a record was removed.
return redis.call('DEL', KEYS[1])
