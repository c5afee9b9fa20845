-- claim: take the idempotency record for one execution, or say why not.
-- KEYS[1] record hash
-- ARGV: owner, lease_ms, ttl_ms, fingerprint ('' = none), task_id, now_ms (0 = server TIME),
--       handoff ('' or the owner id of the execution this retry continues),
--       peek ('1': look only, answer {'free', token} instead of taking the record)
-- Returns {'claimed', token} | {'free', token} | {'done', token, result}
--       | {'in_flight', token, remaining_ms} | {'conflict', token}
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'fp', 'token', 'lease_until', 'result', 'owner')
local state, fp, token = rec[1], rec[2], tonumber(rec[3]) or 0
local mine = ARGV[4]
local now -- read only when needed: a replay asks the clock nothing
if state == 'done' or state == 'in_flight' then
  if mine ~= '' and fp and fp ~= '' and fp ~= mine then
    return {'conflict', token}
  end
  if state == 'done' then
    return {'done', token, rec[5]}
  end
  now = clock_ms(ARGV[6])
  local remaining = (tonumber(rec[4]) or 0) - now
  if remaining > 0 and not (ARGV[7] ~= '' and rec[6] == ARGV[7]) then
    return {'in_flight', token, remaining}
  end
end
-- absent, released, an in-flight claim whose lease expired, or our own retry: take it.
if ARGV[8] == '1' then
  return {'free', token}
end
now = now or clock_ms(ARGV[6])
token = token + 1 -- the script runs alone: read, add, write is one step
redis.call('HSET', key, 'token', token, 'state', 'in_flight', 'owner', ARGV[1], 'fp', mine,
           'lease_until', now + tonumber(ARGV[2]), 'task_id', ARGV[5], 'claimed_at', now)
if rec[5] then -- (a result is only ever beside a 'done' record, which is never taken)
  redis.call('HDEL', key, 'result', 'done_at')
end
redis.call('PEXPIRE', key, math.max(tonumber(ARGV[3]), tonumber(ARGV[2])))
return {'claimed', token}
