-- epoch: (re)create the store's epoch marker; declare amnesia when it had been seen.
-- A Redis that restarted without persistence lost every in-flight claim: for the longest
-- lease, claims fail closed (tasks are re-queued) so an execution still running from
-- before the restart cannot be duplicated.
-- KEYS[1] epoch key, KEYS[2] amnesia marker
-- ARGV: seen_before (1|0), amnesia_ms, epoch_value
-- Returns {created (1|0), amnesia_ms}
local created = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', 604800000)
if ARGV[1] == '1' then
  -- the caller saw the marker before and found it gone: data was lost, whoever
  -- re-created the marker in the meantime
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[2]))
  end
  return {created and 1 or 0, tonumber(ARGV[2])}
end
return {created and 1 or 0, 0}
