-- record: count one call's outcome in the sliding window and make any transition.
-- One script decides, so N workers racing produce exactly one transition.
-- KEYS[1] breaker hash
-- ARGV: now_ms (0 = TIME), owner, outcome ('ok'|'fail'|'slow'|'slowfail'|'none'),
--       probe (1|0), first_attempt (1|0), failure_rate, min_calls, window_ms, buckets,
--       consecutive_failures (0 = off), slow_call_rate (0 = off), open_for_ms,
--       open_for_max_ms (0 = no growth), half_open_probes, name, ttl_ms
-- Returns {state, transitioned (0|1), consecutive_failures}
local key = KEYS[1]
local now = clock_ms(ARGV[1])
local owner, outcome = ARGV[2], ARGV[3]
local probe, first = ARGV[4] == '1', ARGV[5] == '1'
local rate, min_calls = tonumber(ARGV[6]), tonumber(ARGV[7])
local window, nb = tonumber(ARGV[8]), tonumber(ARGV[9])
local max_consec, slow_rate = tonumber(ARGV[10]), tonumber(ARGV[11])
local open_for, open_max, probes = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local ttl = tonumber(ARGV[16])

local rec = redis.call('HMGET', key, 'state', 'consec', 'open_count', 'ho_ok', 'switch', 'lf', 'ls')
local state = rec[1] or 'closed'
local consec = tonumber(rec[2]) or 0
local open_count = tonumber(rec[3]) or 0
local switch = rec[5] or 'normal'
if rec[1] == false then
  redis.call('HSET', key, 'name', ARGV[15], 'state', 'closed', 'changed_at', now)
end
if probe then redis.call('HDEL', key, 'p:' .. owner) end

local function open_breaker()
  local span = open_for
  if open_max > 0 then
    span = math.min(open_max, open_for * (2 ^ open_count))
  end
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 2) == 'p:' then redis.call('HDEL', key, f) end
  end
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'open_until', now + span,
             'changed_at', now, 'open_count', open_count + 1)
  redis.call('HINCRBY', key, 'transitions', 1)
  redis.call('HINCRBY', key, 'opens', 1)
  state = 'open'
end

local idx, slot = bucket_of(now, window, nb)

local transitioned = 0
if outcome ~= 'none' then
  touch_bucket(key, idx, slot)
  local failed = outcome == 'fail' or outcome == 'slowfail'
  local slow = outcome == 'slow' or outcome == 'slowfail'
  redis.call('HINCRBY', key, 'c' .. slot, 1)
  if failed then redis.call('HINCRBY', key, 'f' .. slot, 1) end
  if slow then redis.call('HINCRBY', key, 's' .. slot, 1) end
  if first then redis.call('HINCRBY', key, 'a' .. slot, 1) end
  if failed then consec = consec + 1 else consec = 0 end
  -- lf/ls: the latest interval that counted a failure/slow call. A success while neither
  -- is inside the window cannot trip the breaker (no failures means a rate of 0, below
  -- any failure_rate > 0), so it skips reading the whole window.
  local last_fail, last_slow = tonumber(rec[6]) or -1, tonumber(rec[7]) or -1
  local fields = {'consec', consec, 'window_ms', window, 'nb', nb}
  if failed then
    last_fail = math.max(last_fail, idx)
    fields[#fields + 1] = 'lf'
    fields[#fields + 1] = last_fail
  end
  if slow then
    last_slow = math.max(last_slow, idx)
    fields[#fields + 1] = 'ls'
    fields[#fields + 1] = last_slow
  end
  redis.call('HSET', key, unpack(fields))
  local may_trip = failed or slow or last_fail > idx - nb or (slow_rate > 0 and last_slow > idx - nb)

  if switch == 'breaker_disabled' or switch == 'forced_open' or switch == 'forced_closed' then
    -- an operator holds the state: count, but make no transition
  elseif state == 'half_open' and probe then
    if failed or slow then
      open_breaker()
      transitioned = 1
    else
      local ok = redis.call('HINCRBY', key, 'ho_ok', 1)
      if ok >= probes then
        for s = 0, nb - 1 do
          redis.call('HDEL', key, 't' .. s, 'c' .. s, 'f' .. s, 's' .. s)
        end
        redis.call('HSET', key, 'state', 'closed', 'changed_at', now, 'open_count', 0, 'ho_ok', 0)
        redis.call('HINCRBY', key, 'transitions', 1)
        state = 'closed'
        transitioned = 1
      end
    end
  elseif state == 'closed' and may_trip then
    -- one HMGET for the whole window instead of four HGETs per bucket
    local names = {}
    for s = 0, nb - 1 do
      names[#names + 1] = 't' .. s
      names[#names + 1] = 'c' .. s
      names[#names + 1] = 'f' .. s
      names[#names + 1] = 's' .. s
    end
    local values = redis.call('HMGET', key, unpack(names))
    local calls, fails, slows = 0, 0, 0
    for s = 0, nb - 1 do
      local base = s * 4
      local t = tonumber(values[base + 1] or '-1') or -1
      if t > idx - nb then
        calls = calls + (tonumber(values[base + 2]) or 0)
        fails = fails + (tonumber(values[base + 3]) or 0)
        slows = slows + (tonumber(values[base + 4]) or 0)
      end
    end
    local trip = (calls >= min_calls and fails / calls >= rate)
    if max_consec > 0 and consec >= max_consec then trip = true end
    if slow_rate > 0 and calls >= min_calls and slows / calls >= slow_rate then trip = true end
    if trip then
      open_breaker()
      redis.call('HINCRBY', key, 'trips', 1)
      transitioned = 1
    end
  end
end
redis.call('PEXPIRE', key, ttl)
return {state, transitioned, consec}
