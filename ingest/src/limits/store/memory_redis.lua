-- The Redis commands lease.lua uses, emulated over a Lua table, with Redis's own rules
-- where the script can see them:
-- * values are strings; a number argument becomes its decimal text;
-- * a missing value or field reads as `false` (Redis's nil bulk reply in Lua), a counter
--   that does not exist counts from 0, and integer replies are numbers;
-- * a hash whose last field is deleted is gone (with its TTL);
-- * a key whose TTL has run out is gone. Time is `NOW` (ms), set by the caller before
--   each script run: the request's clock, so simulated time expires keys too.
-- The `memory-store` test of the end-to-end suite holds this file to the real Redis.

local db = {}

local function text(v)
  if type(v) == 'number' then
    if v == math.floor(v) then return string.format('%d', v) end
    return string.format('%.17g', v)
  end
  return v
end

local function live(key)
  local e = db[key]
  if e and e.expires and e.expires <= NOW then
    db[key] = nil
    return nil
  end
  return e
end

local function hash(key, create)
  local e = live(key)
  if not e and create then
    e = { fields = {}, count = 0 }
    db[key] = e
  end
  return e
end

local function counter_add(key, n)
  local e = live(key)
  local v = (e and tonumber(e.value) or 0) + n
  if e then e.value = text(v) else db[key] = { value = text(v) } end
  return v
end

local commands = {}

function commands.HMGET(key, ...)
  local e = hash(key)
  local out = {}
  for i, f in ipairs({ ... }) do
    out[i] = (e and e.fields[text(f)]) or false
  end
  return out
end

function commands.HGET(key, field)
  local e = hash(key)
  return (e and e.fields[text(field)]) or false
end

function commands.HDEL(key, ...)
  local e = hash(key)
  if not e then return 0 end
  local n = 0
  for _, f in ipairs({ ... }) do
    f = text(f)
    if e.fields[f] then
      e.fields[f] = nil
      e.count = e.count - 1
      n = n + 1
    end
  end
  if e.count == 0 then db[key] = nil end
  return n
end

function commands.HINCRBY(key, field, n)
  local e = hash(key, true)
  field = text(field)
  if not e.fields[field] then e.count = e.count + 1 end
  local v = (tonumber(e.fields[field]) or 0) + tonumber(n)
  e.fields[field] = text(v)
  return v
end

function commands.HSET(key, ...)
  local e = hash(key, true)
  local args = { ... }
  local added = 0
  for i = 1, #args, 2 do
    local f = text(args[i])
    if not e.fields[f] then
      e.count = e.count + 1
      added = added + 1
    end
    e.fields[f] = text(args[i + 1])
  end
  return added
end

function commands.HGETALL(key)
  local e = hash(key)
  local out = {}
  if e then
    for f, v in pairs(e.fields) do
      out[#out + 1] = f
      out[#out + 1] = v
    end
  end
  return out
end

function commands.DEL(...)
  local n = 0
  for _, key in ipairs({ ... }) do
    if live(key) then
      db[key] = nil
      n = n + 1
    end
  end
  return n
end

function commands.EXPIRE(key, seconds)
  local e = live(key)
  if not e then return 0 end
  e.expires = NOW + tonumber(seconds) * 1000
  return 1
end

function commands.INCRBY(key, n) return counter_add(key, tonumber(n)) end

function commands.DECRBY(key, n) return counter_add(key, -tonumber(n)) end

-- The server's clock: `NOW`, as two strings (seconds, microseconds), like Redis.
function commands.TIME()
  return { string.format('%d', math.floor(NOW / 1000)), string.format('%d', (NOW % 1000) * 1000) }
end

function commands.MGET(...)
  local out = {}
  for i, key in ipairs({ ... }) do
    local e = live(key)
    out[i] = (e and e.value) or false
  end
  return out
end

redis = {
  call = function(name, ...)
    local command = commands[string.upper(name)]
    if not command then error('memory store: no emulation of ' .. name) end
    return command(...)
  end,
}

-- Keys that exist now, for tests.
function memory_keys()
  local out = {}
  for key in pairs(db) do
    if live(key) then out[#out + 1] = key end
  end
  return out
end
