-- release: give the claim back after a failure so a retry or redelivery can run.
-- The token counter stays, so fencing tokens are never reused for this key.
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: head ('in_flight\n<token>\n<owner>\n'), ttl_ms
-- Returns 1 when released, 0 when the claim was no longer ours.
local key, head = KEYS[1], ARGV[1]
local raw = redis.pcall('GET', key)
if type(raw) == 'string' and string.sub(raw, 1, #head) == head then
  -- Only the state changes: owner and life stay as history (who held the claim last).
  redis.call('SET', key, 'released' .. string.sub(raw, #'in_flight' + 1), 'PX', ARGV[2])
  return 1
end
--@include _record.lua
record_text(key) -- an error other than a hash's WRONGTYPE fails the op
return 0
