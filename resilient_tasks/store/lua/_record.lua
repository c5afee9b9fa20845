-- An idempotency record is one string, its fields joined by newlines:
--   state, token, owner, life, fp, task_id, result
-- state: in_flight | done | released; life: the ttl a claim keeps for after its lease
-- (the lease left is PTTL - life); result: the stored JSON, last because only it is
-- long, '' until done (the task id is written with its newlines replaced). One string
-- makes a fresh claim a single SET NX PX of a text the client wrote, and lets complete,
-- renew and release check ownership by the record's head ('in_flight\n<token>\n<owner>\n',
-- also the client's) without parsing the rest. Scripts include this file after their
-- usual path has returned, so that path does not pay for defining these functions.

-- record_text: the record's string, false when there is none, or nil when the key holds
-- a hash (written by an earlier release); any other error (an ACL refusal) fails the op.
local function record_text(key)
  local raw = redis.pcall('GET', key)
  if type(raw) == 'table' then
    if string.find(raw.err, 'WRONGTYPE', 1, true) then return nil end
    error(raw)
  end
  return raw
end

-- read_record: the record at key as a table, or nil when there is none (an error when
-- the key holds something else). An earlier release's hash is read the same way; the
-- next write of that key replaces it with a string.
local function read_record(key)
  local raw = record_text(key)
  if raw == nil then
    local h = redis.call('HMGET', key, 'state', 'token', 'owner', 'life', 'fp', 'task_id', 'result',
                         'lease_until')
    if not h[1] then return nil end
    return {state = h[1], token = tonumber(h[2]) or 0, owner = h[3] or '', life = tonumber(h[4]),
            fp = h[5] or '', task_id = h[6] or '', result = h[7], lease_until = tonumber(h[8])}
  end
  if not raw then return nil end
  local state, token, owner, life, fp, task_id, result =
    string.match(raw, '^([^\n]*)\n([^\n]*)\n([^\n]*)\n([^\n]*)\n([^\n]*)\n([^\n]*)\n(.*)$')
  if not state then -- not ours to overwrite: the op fails visibly
    error({err = 'ERR the value at ' .. key .. ' is not an idempotency record'})
  end
  if state ~= 'done' then result = nil end
  return {state = state, token = tonumber(token) or 0, owner = owner, life = tonumber(life), fp = fp,
          task_id = task_id, result = result}
end

-- refusal: what a complete, renew or release whose head did not match learns.
local function refusal(key)
  local rec = read_record(key)
  if not rec then return {0, ''} end
  return {0, rec.state, rec.result}
end
