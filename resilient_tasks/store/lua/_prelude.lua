-- Shared by every script (prepended when the scripts are loaded).
-- clock_ms: the caller's clock in ms when it sends one (tests, simulations), else the
-- Redis server's TIME, so a fleet of workers with skewed clocks shares one clock.
local function clock_ms(arg)
  local given = tonumber(arg)
  if given and given ~= 0 then
    return given
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
