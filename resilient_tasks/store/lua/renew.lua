-- renew: extend the lease of a running execution (the heartbeat).
-- KEYS[1] record hash
-- ARGV: owner, token, lease_ms, ttl_ms, now_ms (unused: the lease is the record's expiry)
-- Returns 1 when renewed, 0 when the claim was lost.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'owner', 'token', 'life')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] or rec[3] ~= ARGV[2] then
  return 0
end
-- the lease left is PTTL - life (see claim.lua)
redis.call('PEXPIRE', key, tonumber(ARGV[3]) + (tonumber(rec[4]) or tonumber(ARGV[4])))
return 1
