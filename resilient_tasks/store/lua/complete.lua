--@include _record.lua
-- complete: store the result, only if this execution still owns the claim.
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: owner, token, result_json, ttl_ms, refresh ('1': the record lives ttl from now)
-- Returns {1} when stored; {0, state, result} when the claim was lost (the write is
-- refused and the caller learns what the record holds now; state '' = gone).
-- A claim lives lease + ttl, so a completion made in the first half of its lease leaves
-- at least ttl: the caller, who knows how long it ran, asks for a new expiry only when
-- it ran longer; otherwise the write keeps the record's (GET, SET and the EVALSHA).
local key = KEYS[1]
local raw = record_text(key)
local head = record_head('in_flight', ARGV[2], ARGV[1])
if type(raw) ~= 'string' or string.sub(raw, 1, #head) ~= head then
  local rec = read_record(key)
  if not rec then return {0, ''} end
  return {0, rec.state, rec.result}
end
-- an in-flight record ends with its empty result: the done record is its fields and ours
local done = 'done' .. string.sub(raw, #'in_flight' + 1) .. ARGV[3]
if ARGV[5] == '1' then
  redis.call('SET', key, done, 'PX', ARGV[4])
else
  redis.call('SET', key, done, 'KEEPTTL')
end
return {1}
