--@include _record.lua
-- renew: extend the lease of a running execution (the heartbeat).
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: owner, token, lease_ms, ttl_ms, now_ms (unused: the lease is the record's expiry)
-- Returns 1 when renewed, 0 when the claim was lost.
local key = KEYS[1]
local raw = record_text(key)
local head = record_head('in_flight', ARGV[2], ARGV[1])
if type(raw) ~= 'string' or string.sub(raw, 1, #head) ~= head then
  return 0
end
-- the lease left is PTTL - life (see claim.lua); life is the field after the head
local life = tonumber(string.match(raw, '^(%d+)\n', #head + 1))
redis.call('PEXPIRE', key, tonumber(ARGV[3]) + (life or tonumber(ARGV[4])))
return 1
