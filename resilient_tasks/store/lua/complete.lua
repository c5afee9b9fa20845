-- complete: store the result, only if this execution still owns the claim.
-- KEYS[1] record hash
-- ARGV: owner, token, result_json, ttl_ms
-- Returns {1} when stored; {0, state, result} when the claim was lost (the write is
-- refused and the caller learns what the record holds now; state '' = gone).
-- Three commands: read, write, expire (no clock: nothing stored depends on it).
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'owner', 'token', 'result')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] or rec[3] ~= ARGV[2] then
  return {0, rec[1] or '', rec[4]}
end
-- (lease_until stays: a 'done' record is never in flight again)
redis.call('HSET', key, 'state', 'done', 'result', ARGV[3])
redis.call('PEXPIRE', key, tonumber(ARGV[4]))
return {1}
