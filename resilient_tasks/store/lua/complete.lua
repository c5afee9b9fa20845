-- complete: store the result, only if this execution still owns the claim.
-- KEYS[1] record hash
-- ARGV: owner, token, result_json, ttl_ms, refresh ('1': the record lives ttl from now)
-- Returns {1} when stored; {0, state, result} when the claim was lost (the write is
-- refused and the caller learns what the record holds now; state '' = gone).
-- A claim lives lease + ttl, so a completion made in the first half of its lease leaves
-- at least ttl: the caller, who knows how long it ran, asks for the PEXPIRE only when
-- it ran longer (two commands and the EVALSHA on the usual path).
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'owner', 'token', 'result')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] or rec[3] ~= ARGV[2] then
  return {0, rec[1] or '', rec[4]}
end
redis.call('HSET', key, 'state', 'done', 'result', ARGV[3])
if ARGV[5] == '1' then
  redis.call('PEXPIRE', key, tonumber(ARGV[4]))
end
return {1}
