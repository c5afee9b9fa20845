--@include _record.lua
-- claim: take the idempotency record for one execution, or say why not.
-- KEYS[1] record (a string, see _record.lua)
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
local mine = ARGV[4]
local px = tonumber(ARGV[2]) + tonumber(ARGV[3])
local tail = ARGV[3] .. '\n' .. mine .. '\n' .. ARGV[5] .. '\n'
-- the usual path: no record yet, one command takes it
if ARGV[8] ~= '1' and redis.call('SET', key, record_head('in_flight', 1, ARGV[1]) .. tail, 'NX', 'PX', px) then
  return {'claimed', 1}
end
local rec = read_record(key)
local token = rec and rec.token or 0
if rec and (rec.state == 'done' or rec.state == 'in_flight') then
  if mine ~= '' and rec.fp ~= '' and rec.fp ~= mine then
    return {'conflict', token}
  end
  if rec.state == 'done' then
    return {'done', token, rec.result}
  end
  local remaining
  if rec.life then
    remaining = redis.call('PTTL', key) - rec.life
  else -- written by an earlier release, which kept the lease's end on the server's clock
    remaining = (rec.lease_until or 0) - clock_ms(ARGV[6])
  end
  if remaining > 0 and not (ARGV[7] ~= '' and rec.owner == ARGV[7]) then
    return {'in_flight', token, remaining}
  end
end
-- absent, released, an in-flight claim whose lease expired, or our own retry: take it.
if ARGV[8] == '1' then
  return {'free', token}
end
token = token + 1 -- the script runs alone: read, add, write is one step
redis.call('SET', key, record_head('in_flight', token, ARGV[1]) .. tail, 'PX', px)
return {'claimed', token}
