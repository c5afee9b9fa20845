--@include _record.lua
-- release: give the claim back after a failure so a retry or redelivery can run.
-- The token counter stays, so fencing tokens are never reused for this key.
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: owner, token, ttl_ms
-- Returns 1 when released, 0 when the claim was no longer ours.
local key = KEYS[1]
local raw = record_text(key)
local head = record_head('in_flight', ARGV[2], ARGV[1])
if type(raw) ~= 'string' or string.sub(raw, 1, #head) ~= head then
  return 0
end
-- Only the state changes: owner and life stay as history (who held the claim last).
redis.call('SET', key, 'released' .. string.sub(raw, #'in_flight' + 1), 'PX', ARGV[3])
return 1
