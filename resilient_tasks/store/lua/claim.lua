-- claim: take the idempotency record for one execution, or say why not.
-- KEYS[1] record hash
-- ARGV: owner, lease_ms, ttl_ms, fingerprint ('' = none), task_id, now_ms (0 = server TIME;
--       read only for a record written before leases were expiries, see below),
--       handoff ('' or the owner id of the execution this retry continues),
--       peek ('1': look only, answer {'free', token} instead of taking the record)
-- Returns {'claimed', token} | {'free', token} | {'done', token, result}
--       | {'in_flight', token, remaining_ms} | {'conflict', token}
--
-- The lease is the record's own expiry: a claim lives lease + ttl and keeps its ttl in
-- 'life', so the lease left is PTTL - life. Redis's expiry clock is the fleet's one
-- clock, and taking a record asks no clock at all.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'fp', 'token', 'result', 'owner', 'life', 'lease_until')
local state, fp, token = rec[1], rec[2], tonumber(rec[3]) or 0
local mine = ARGV[4]
if state == 'done' or state == 'in_flight' then
  if mine ~= '' and fp and fp ~= '' and fp ~= mine then
    return {'conflict', token}
  end
  if state == 'done' then
    return {'done', token, rec[4]}
  end
  local remaining
  local life = tonumber(rec[6])
  if life then
    remaining = redis.call('PTTL', key) - life
  else -- written by an earlier release, which kept the lease's end on the server's clock
    remaining = (tonumber(rec[7]) or 0) - clock_ms(ARGV[6])
  end
  if remaining > 0 and not (ARGV[7] ~= '' and rec[5] == ARGV[7]) then
    return {'in_flight', token, remaining}
  end
end
-- absent, released, an in-flight claim whose lease expired, or our own retry: take it.
if ARGV[8] == '1' then
  return {'free', token}
end
token = token + 1 -- the script runs alone: read, add, write is one step
redis.call('HSET', key, 'token', token, 'state', 'in_flight', 'owner', ARGV[1], 'fp', mine,
           'life', ARGV[3], 'task_id', ARGV[5])
if rec[4] or rec[7] then -- a result is only ever beside a 'done' record (never taken)
  redis.call('HDEL', key, 'result', 'lease_until')
end
redis.call('PEXPIRE', key, tonumber(ARGV[2]) + tonumber(ARGV[3]))
return {'claimed', token}
