-- renew: extend the lease of a running execution (the heartbeat).
-- KEYS[1] record hash
-- ARGV: owner, token, lease_ms, ttl_ms, now_ms (0 = server TIME)
-- Returns 1 when renewed, 0 when the claim was lost.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'owner', 'token')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] or rec[3] ~= ARGV[2] then
  return 0
end
local lease = tonumber(ARGV[3])
redis.call('HSET', key, 'lease_until', clock_ms(ARGV[5]) + lease)
redis.call('PEXPIRE', key, math.max(tonumber(ARGV[4]), lease))
return 1
