-- renew: extend the lease of a running execution (the heartbeat).
-- KEYS[1] record (a string, see _record.lua)
-- ARGV: head ('in_flight\n<token>\n<owner>\n'), lease_ms
-- Returns 1 when renewed, 0 when the claim was lost.
local key, head = KEYS[1], ARGV[1]
local raw = redis.pcall('GET', key)
if type(raw) == 'string' and string.sub(raw, 1, #head) == head then
  -- the lease left is PTTL - life (see claim.lua); life is the field after the head
  local life = tonumber(string.match(raw, '^(%d+)\n', #head + 1))
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) + life)
  return 1
end
--@include _record.lua
record_text(key) -- an error other than a hash's WRONGTYPE fails the op
return 0
