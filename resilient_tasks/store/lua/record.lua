--@include _prelude.lua
-- record: count outcomes in the sliding window and make any transition.
-- One script decides, so N workers racing produce exactly one transition.
-- A record may carry many calls (a process flushing the successes it summed): they are
-- taken as successes first, then failures, so the consecutive-failure count can only be
-- over-counted, never under-counted.
-- The common paths are one read, the clock and one write: a success with no failure
-- (slow call) in the window skips reading the window; a failure reads it with the record
-- itself. The record's TTL is renewed when a record starts a bucket's interval, creates
-- the record or moves the breaker, not on every call (the TTL spans many windows).
-- KEYS[1] breaker hash
-- ARGV: now_ms (0 = TIME), owner, ok, fail, slow, slowfail, first_attempts,
--       probe (1|0), failure_rate, min_calls, window_ms, buckets,
--       consecutive_failures (0 = off), slow_call_rate (0 = off), open_for_ms,
--       open_for_max_ms (0 = no growth), half_open_probes, name, ttl_ms
-- Returns {state, transitioned (0|1), consecutive_failures, switch}
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
local calls = n_ok + n_fail + n_slow + n_slowfail
local failed_n, slow_n = n_fail + n_slowfail, n_slow + n_slowfail

-- The window's other slots, as HMGET names: t/c/f (and s when slow calls count) of each
-- slot but this interval's, which the record reads anyway and the sums take as written.
local STRIDE = 3
if slow_rate > 0 then STRIDE = 4 end
local function window_names(names)
  for s = 0, nb - 1 do
    if s ~= slot then
      names[#names + 1] = 't' .. s
      names[#names + 1] = 'c' .. s
      names[#names + 1] = 'f' .. s
      if STRIDE == 4 then names[#names + 1] = 's' .. s end
    end
  end
  return names
end

-- the record's fields, this interval's slot, and (a failure or slow call among the
-- calls, not a probe's: a closed breaker checks its rates) the rest of the window, in
-- one HMGET
local WIN = 14 -- where the window's other slots start in the answer
local bad = failed_n > 0 or slow_n > 0
local whole = bad and not probe
local names = {'state', 'consec', 'open_count', 'switch', 'lf', 'ls', 'window_ms', 'nb',
               't' .. slot, 'c' .. slot, 'f' .. slot, 's' .. slot, 'a' .. slot}
if whole then window_names(names) end
local rec = redis.call('HMGET', key, unpack(names))
local state = rec[1] or 'closed'
local consec = tonumber(rec[2]) or 0
local open_count = tonumber(rec[3]) or 0
local switch = rec[4] or 'normal'
local renew = false -- renew the TTL?

-- every change of the record and its slot goes out in one HSET
local fields = {}
local function put(name, value)
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
if rec[1] == false then
  put('name', ARGV[18])
  put('state', 'closed')
  put('changed_at', now)
  renew = true
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

-- the window's calls, failures and slow calls; the current slot as this record left it
local slot_c, slot_f, slot_s = 0, 0, 0
local function window_sums(values, base)
  local w_calls, w_fails, w_slows = slot_c, slot_f, slot_s
  local at = base
  for s = 0, nb - 1 do
    if s ~= slot then
      local t = tonumber(values[at] or '-1') or -1
      if t > idx - nb then
        w_calls = w_calls + (tonumber(values[at + 1]) or 0)
        w_fails = w_fails + (tonumber(values[at + 2]) or 0)
        if STRIDE == 4 then w_slows = w_slows + (tonumber(values[at + 3]) or 0) end
      end
      at = at + STRIDE
    end
  end
  return w_calls, w_fails, w_slows
end

local transitioned = 0
local last_fail, last_slow = tonumber(rec[5]) or -1, tonumber(rec[6]) or -1
if calls > 0 or n_first > 0 then
  -- the slot's counts as read, or zeros when it still holds an older interval (then all
  -- of it is written); otherwise only the counts that change
  local c0, f0, s0, a0 = 0, 0, 0, 0
  local fresh = tonumber(rec[9] or '-1') ~= idx
  if fresh then
    put('t' .. slot, idx)
    put('r' .. slot, 0)
    renew = true
  else
    c0, f0, s0, a0 = tonumber(rec[10]) or 0, tonumber(rec[11]) or 0, tonumber(rec[12]) or 0, tonumber(rec[13]) or 0
  end
  slot_c, slot_f, slot_s = c0 + calls, f0 + failed_n, s0 + slow_n
  if fresh or calls > 0 then put('c' .. slot, slot_c) end
  if fresh or failed_n > 0 then put('f' .. slot, slot_f) end
  if fresh or slow_n > 0 then put('s' .. slot, slot_s) end
  if fresh or n_first > 0 then put('a' .. slot, a0 + n_first) end
  if calls > 0 then
    local was = consec
    if n_ok + n_slow > 0 then consec = failed_n else consec = consec + failed_n end
    if rec[2] == false or consec ~= was then put('consec', consec) end
    -- window_ms/nb: what an operator's status reads the window with
    if tonumber(rec[7]) ~= window then put('window_ms', window) end
    if tonumber(rec[8]) ~= nb then put('nb', nb) end
    -- lf/ls: the latest interval that counted a failure/slow call. A success while neither
    -- is inside the window cannot trip the breaker (no failures means a rate of 0, below
    -- any failure_rate > 0), so it skips reading the whole window.
    if failed_n > 0 and idx > last_fail then
      last_fail = idx
      put('lf', last_fail)
    end
    if slow_n > 0 and idx > last_slow then
      last_slow = idx
      put('ls', last_slow)
    end
  end
end
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
end
if calls > 0 then
  local may_trip = bad or last_fail > idx - nb or (slow_rate > 0 and last_slow > idx - nb)

  if switch == 'breaker_disabled' or switch == 'forced_open' or switch == 'forced_closed' then
    -- an operator holds the state: count, but make no transition
  elseif state == 'half_open' and probe then
    if bad then
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
    local w_calls, w_fails, w_slows
    if whole then -- read with the record
      w_calls, w_fails, w_slows = window_sums(rec, WIN)
    else -- a success with a failure (slow call) still in the window: one HMGET of it
      local others, values = window_names({}), {}
      if #others > 0 then values = redis.call('HMGET', key, unpack(others)) end -- (one bucket: none)
      w_calls, w_fails, w_slows = window_sums(values, 1)
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
if renew or transitioned == 1 then
  redis.call('PEXPIRE', key, tonumber(ARGV[19]))
end
return {state, transitioned, consec, switch}
