-- claim: take the idempotency record for one execution, or say why not.
-- KEYS[1] record hash; optional KEYS[2] epoch key, KEYS[3] amnesia marker (single-node
-- Redis only: they guard against a restart that lost every in-flight record)
-- ARGV: owner, lease_ms, ttl_ms, fingerprint ('' = none), task_id, now_ms (0 = server TIME),
--       handoff ('' or the owner id of the execution this retry continues),
--       peek ('1': look only, answer {'free', token} instead of taking the record)
-- Returns {'claimed', token} | {'free', token} | {'done', token, result, done_at_ms, now_ms}
--       | {'in_flight', token, remaining_ms} | {'conflict', token}
--       | {'amnesia', 0, remaining_ms} | {'no_epoch', 0}
local key = KEYS[1]
if KEYS[3] then
  local window = redis.call('PTTL', KEYS[3])
  if window > 0 then
    return {'amnesia', 0, window}
  end
  if redis.call('EXISTS', KEYS[2]) == 0 then
    return {'no_epoch', 0}
  end
  if redis.call('PTTL', KEYS[2]) < 518400000 then
    redis.call('PEXPIRE', KEYS[2], 604800000)
  end
end
local now = clock_ms(ARGV[6])
local rec = redis.call('HMGET', key, 'state', 'fp', 'token', 'lease_until', 'result', 'done_at')
local state, fp, token = rec[1], rec[2], tonumber(rec[3]) or 0
local mine = ARGV[4]
if state == 'done' or state == 'in_flight' then
  if mine ~= '' and fp and fp ~= '' and fp ~= mine then
    return {'conflict', token}
  end
  if state == 'done' then
    return {'done', token, rec[5], tonumber(rec[6]) or now, now}
  end
  local remaining = (tonumber(rec[4]) or 0) - now
  local handoff = ARGV[7] ~= '' and redis.call('HGET', key, 'owner') == ARGV[7]
  if remaining > 0 and not handoff then
    return {'in_flight', token, remaining}
  end
end
-- absent, released, an in-flight claim whose lease expired, or our own retry: take it.
if ARGV[8] == '1' then
  return {'free', token}
end
token = redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'state', 'in_flight', 'owner', ARGV[1], 'fp', mine,
           'lease_until', now + tonumber(ARGV[2]), 'task_id', ARGV[5], 'claimed_at', now)
redis.call('HDEL', key, 'result', 'done_at')
redis.call('PEXPIRE', key, math.max(tonumber(ARGV[3]), tonumber(ARGV[2])))
return {'claimed', token}
