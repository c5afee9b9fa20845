-- claim: take the idempotency record for one execution, or say why not.
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: the record a fresh claim writes ('in_flight\n1\n<owner>\n<ttl_ms>\n<fp>\n<task_id>\n',
--       fp '' = none), px (lease_ms + ttl_ms), then, each omitted when empty:
--       handoff ('' or the owner id of the execution this retry continues),
--       peek ('1': look only, answer {'free', token} instead of taking the record),
--       now_ms (read only for a record written before leases were expiries, see below)
-- Returns token (a number: claimed) | {'free', token} | {'done', token, result}
--       | {'in_flight', token, remaining_ms} | {'conflict', token}
--
-- The lease is the record's own expiry: a claim lives lease + ttl and keeps its ttl in
-- 'life', so the lease left is PTTL - life. Redis's expiry clock is the fleet's one
-- clock, and taking a record asks no clock at all.
local key, fresh = KEYS[1], ARGV[1]
local peek = ARGV[4] == '1'
-- the usual path: no record yet, one command takes it. (pcall: a full Redis refuses a
-- script's first write even when NX would not write; the record is then still read,
-- so a replay or an in-flight answer needs no memory, and a write that does fails below.)
if not peek then
  local set = redis.pcall('SET', key, fresh, 'NX', 'PX', ARGV[2])
  if type(set) == 'table' and set.ok then
    return 1
  end
end
--@include _prelude.lua
--@include _record.lua
local mine = string.match(fresh, '^in_flight\n1\n[^\n]*\n[^\n]*\n([^\n]*)\n') -- its fingerprint
local handoff = ARGV[3] or ''
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
    remaining = (rec.lease_until or 0) - clock_ms(ARGV[5])
  end
  if remaining > 0 and not (handoff ~= '' and rec.owner == handoff) then
    return {'in_flight', token, remaining}
  end
end
-- absent, released, an in-flight claim whose lease expired, or our own retry: take it.
if peek then
  return {'free', token}
end
token = token + 1 -- the script runs alone: read, add, write is one step
redis.call('SET', key, 'in_flight\n' .. token .. string.sub(fresh, #'in_flight\n1' + 1), 'PX', ARGV[2])
return token
