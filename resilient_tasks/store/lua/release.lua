-- release: give the claim back after a failure so a retry or redelivery can run.
-- The token counter stays, so fencing tokens are never reused for this key.
-- KEYS[1] record hash
-- ARGV: owner, token, ttl_ms
-- Returns 1 when released, 0 when the claim was no longer ours.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'owner', 'token')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] or rec[3] ~= ARGV[2] then
  return 0
end
-- Only the state changes: owner and life are read only beside 'in_flight', so they
-- stay as history (who held the claim last) instead of costing an HDEL.
redis.call('HSET', key, 'state', 'released')
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
return 1
