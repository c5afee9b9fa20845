-- complete: store the result, only if this execution still owns the claim.
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: head ('in_flight\n<token>\n<owner>\n'), result_json, then ttl_ms only when the
--       record is to live ttl from now (omitted: it keeps its expiry)
-- Returns 1 when stored; {0, state, result} when the claim was lost (the write is
-- refused and the caller learns what the record holds now; state '' = gone).
-- A claim lives lease + ttl, so a completion made in the first half of its lease leaves
-- at least ttl: the caller, who knows how long it ran, asks for a new expiry only when
-- it ran longer (GET, SET and the EVALSHA either way).
local key, head = KEYS[1], ARGV[1]
local raw = redis.pcall('GET', key)
if type(raw) == 'string' and string.sub(raw, 1, #head) == head then
  -- an in-flight record ends with its empty result: the done record is its fields and ours
  local done = 'done' .. string.sub(raw, #'in_flight' + 1) .. ARGV[2]
  if ARGV[3] then
    redis.call('SET', key, done, 'PX', ARGV[3])
  else
    redis.call('SET', key, done, 'KEEPTTL')
  end
  return 1
end
--@include _record.lua
return refusal(key)
