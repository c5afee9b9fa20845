-- record: count outcomes in the sliding window and make any transition.
-- One script decides, so N workers racing produce exactly one transition.
-- A record may carry many calls (a process flushing the successes it summed): they are
-- taken as successes first, then failures, so the consecutive-failure count can only be
-- over-counted, never under-counted.
-- KEYS[1] breaker hash
-- ARGV: now_ms (0 = TIME), owner, ok, fail, slow, slowfail, first_attempts,
--       probe (1|0), failure_rate, min_calls, window_ms, buckets,
--       consecutive_failures (0 = off), slow_call_rate (0 = off), open_for_ms,
--       open_for_max_ms (0 = no growth), half_open_probes, name, ttl_ms
-- Returns {state, transitioned (0|1), consecutive_failures}
local key = KEYS[1]
local now = clock_ms(ARGV[1])
local owner = ARGV[2]
local n_ok, n_fail, n_slow, n_slowfail = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n_first, probe = tonumber(ARGV[7]), ARGV[8] == '1'
local rate, min_calls = tonumber(ARGV[9]), tonumber(ARGV[10])
local window, nb = tonumber(ARGV[11]), tonumber(ARGV[12])
local max_consec, slow_rate = tonumber(ARGV[13]), tonumber(ARGV[14])
local open_for, open_max, probes = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local idx, slot = bucket_of(now, window, nb)

local rec = redis.call('HMGET', key, 'state', 'consec', 'open_count', 'switch', 'lf', 'ls',
                       't' .. slot, 'c' .. slot, 'f' .. slot, 's' .. slot, 'a' .. slot)
local state = rec[1] or 'closed'
local consec = tonumber(rec[2]) or 0
local open_count = tonumber(rec[3]) or 0
local switch = rec[4] or 'normal'
if rec[1] == false then
  redis.call('HSET', key, 'name', ARGV[18], 'state', 'closed', 'changed_at', now)
end
if probe then redis.call('HDEL', key, 'p:' .. owner) end

local function open_breaker()
  local span = open_for
  if open_max > 0 then
    span = math.min(open_max, open_for * (2 ^ open_count))
  end
  drop_probes(key)
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'open_until', now + span,
             'changed_at', now, 'open_count', open_count + 1)
  redis.call('HINCRBY', key, 'transitions', 1)
  redis.call('HINCRBY', key, 'opens', 1)
  state = 'open'
end

local calls = n_ok + n_fail + n_slow + n_slowfail
local transitioned = 0
if calls > 0 or n_first > 0 then
  -- the slot's counts as read, or zeros when it still holds an older interval; every
  -- change then goes out in one HSET
  local failed_n, slow_n = n_fail + n_slowfail, n_slow + n_slowfail
  local c0, f0, s0, a0 = 0, 0, 0, 0
  local fields = {}
  if tonumber(rec[7] or '-1') == idx then
    c0, f0, s0, a0 = tonumber(rec[8]) or 0, tonumber(rec[9]) or 0, tonumber(rec[10]) or 0, tonumber(rec[11]) or 0
  else
    fields = {'t' .. slot, idx, 'r' .. slot, 0}
  end
  local n = #fields
  fields[n + 1], fields[n + 2] = 'c' .. slot, c0 + calls
  fields[n + 3], fields[n + 4] = 'f' .. slot, f0 + failed_n
  fields[n + 5], fields[n + 6] = 's' .. slot, s0 + slow_n
  fields[n + 7], fields[n + 8] = 'a' .. slot, a0 + n_first
  local last_fail, last_slow = tonumber(rec[5]) or -1, tonumber(rec[6]) or -1
  if calls > 0 then
    if n_ok + n_slow > 0 then consec = failed_n else consec = consec + failed_n end
    -- lf/ls: the latest interval that counted a failure/slow call. A success while neither
    -- is inside the window cannot trip the breaker (no failures means a rate of 0, below
    -- any failure_rate > 0), so it skips reading the whole window.
    fields[#fields + 1], fields[#fields + 2] = 'consec', consec
    fields[#fields + 1], fields[#fields + 2] = 'window_ms', window
    fields[#fields + 1], fields[#fields + 2] = 'nb', nb
    if failed_n > 0 then
      last_fail = math.max(last_fail, idx)
      fields[#fields + 1], fields[#fields + 2] = 'lf', last_fail
    end
    if slow_n > 0 then
      last_slow = math.max(last_slow, idx)
      fields[#fields + 1], fields[#fields + 2] = 'ls', last_slow
    end
  end
  redis.call('HSET', key, unpack(fields))
  if calls > 0 then
    local may_trip = failed_n > 0 or slow_n > 0 or last_fail > idx - nb
      or (slow_rate > 0 and last_slow > idx - nb)

    if switch == 'breaker_disabled' or switch == 'forced_open' or switch == 'forced_closed' then
      -- an operator holds the state: count, but make no transition
    elseif state == 'half_open' and probe then
      if failed_n > 0 or slow_n > 0 then
        open_breaker()
        transitioned = 1
      elseif redis.call('HINCRBY', key, 'ho_ok', 1) >= probes then
        for s = 0, nb - 1 do
          redis.call('HDEL', key, 't' .. s, 'c' .. s, 'f' .. s, 's' .. s)
        end
        redis.call('HSET', key, 'state', 'closed', 'changed_at', now, 'open_count', 0, 'ho_ok', 0)
        redis.call('HINCRBY', key, 'transitions', 1)
        state = 'closed'
        transitioned = 1
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
      local w_calls, w_fails, w_slows = 0, 0, 0
      for s = 0, nb - 1 do
        local base = s * 4
        local t = tonumber(values[base + 1] or '-1') or -1
        if t > idx - nb then
          w_calls = w_calls + (tonumber(values[base + 2]) or 0)
          w_fails = w_fails + (tonumber(values[base + 3]) or 0)
          w_slows = w_slows + (tonumber(values[base + 4]) or 0)
        end
      end
      local trip = (w_calls >= min_calls and w_fails / w_calls >= rate)
      if max_consec > 0 and consec >= max_consec then trip = true end
      if slow_rate > 0 and w_calls >= min_calls and w_slows / w_calls >= slow_rate then trip = true end
      if trip then
        open_breaker()
        redis.call('HINCRBY', key, 'trips', 1)
        transitioned = 1
      end
    end
  end
end
redis.call('PEXPIRE', key, tonumber(ARGV[19]))
return {state, transitioned, consec}
