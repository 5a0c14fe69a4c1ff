-- KEYS: 1 window hash (slot -> grants, plus 's' = their sum and 'c' = slots below it are
--       gone), 2 day counter, 3 month counter, 4/5 day/month counters of the give-back,
--       6/7 day/month counters of the spends
-- ARGV: 1 the caller's now_ms, 2 want, 3 rate limit, 4 daily cap (-1: none), 5 monthly
--       limit (-1: none), 6 instances, 7 give-back tokens, 8 give-back slot, 9 spends total,
--       10 window slots, 11 whose clock is the time (0: the server's, 1: the caller's, for
--       tests that simulate days), then slot/count pairs
-- The sum is kept as slots come and go, so a call touches only the slots that left the
-- window since the last one (usually one or two), not all of them.
--
-- Time is the Redis server's (TIME): instances whose clocks disagree share one window, and
-- none can move its low mark past the others' slots. The caller's clock only translates
-- the slots it sends (its give-back and spends) into the server's, never ahead of now.
local caller = tonumber(ARGV[1])
local now = caller
if ARGV[11] ~= '1' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local slot = math.floor(now / 1000)
local shift = slot - math.floor(caller / 1000)
local function ours(s) return math.min(s + shift, slot) end
local window = tonumber(ARGV[10])
local keep = slot - window + 1
local w = KEYS[1]
local state = redis.call('HMGET', w, 's', 'c')
local sum = tonumber(state[1] or '0')
local fresh = not state[2]
local gone = tonumber(state[2] or tostring(keep))
local was_gone = gone
if gone < keep then
  if keep - gone > window then
    redis.call('DEL', w)
    sum = 0
    fresh = true
  else
    for s = gone, keep - 1 do
      local v = redis.call('HGET', w, s)
      if v then
        sum = sum - tonumber(v)
        redis.call('HDEL', w, s)
      end
    end
  end
  gone = keep
end
local function add(s, n)
  if s >= gone then
    local v = redis.call('HINCRBY', w, s, n)
    if v <= 0 then redis.call('HDEL', w, s); n = n - v end
    sum = sum + n
  end
end
-- A counter incremented: its TTL is set when the increment created it.
local function incr(k, n, ttl)
  if redis.call('INCRBY', k, n) == n then redis.call('EXPIRE', k, ttl) end
end
local gb = tonumber(ARGV[7])
if gb > 0 then
  -- Never below zero: a slot that is gone or was never granted gives nothing back.
  add(ours(tonumber(ARGV[8])), -gb)
  for _, k in ipairs({KEYS[4], KEYS[5]}) do
    local v = redis.call('DECRBY', k, gb)
    if v == -gb then redis.call('DEL', k)
    elseif v < 0 then redis.call('INCRBY', k, -v) end
  end
end
local spent = tonumber(ARGV[9])
if spent > 0 then
  for i = 12, #ARGV, 2 do
    local s = ours(tonumber(ARGV[i]))
    if s >= keep then add(s, tonumber(ARGV[i + 1])) end
  end
  incr(KEYS[6], spent, 172800)
  incr(KEYS[7], spent, 3456000)
end
local used = redis.call('MGET', KEYS[2], KEYS[3])
local day_used = tonumber(used[1] or '0')
local month_used = tonumber(used[2] or '0')
local function save()
  redis.call('HSET', w, 's', sum, 'c', gone)
  -- Refreshed once per minute of window movement: a window left alone for 2 minutes holds
  -- only slots that are out of the window anyway.
  if fresh or math.floor(gone / 60) ~= math.floor(was_gone / 60) then
    redis.call('EXPIRE', w, 180)
  end
end
local want = tonumber(ARGV[2])
if want <= 0 then save(); return {0, 0, 0, day_used, month_used} end
local room = tonumber(ARGV[3]) - sum
if room <= 0 then
  save()
  -- When the oldest slot still counting leaves the window (a scan, on refusals only).
  local oldest = nil
  local fields = redis.call('HGETALL', w)
  for i = 1, #fields, 2 do
    local s = tonumber(fields[i])
    if s and tonumber(fields[i + 1]) > 0 and (oldest == nil or s < oldest) then oldest = s end
  end
  local retry = 1000
  if oldest ~= nil then retry = (oldest + window) * 1000 - now end
  return {0, 1, retry, day_used, month_used}
end
local cap = tonumber(ARGV[4])
if cap >= 0 then
  if day_used >= cap then save(); return {0, 2, 0, day_used, month_used} end
  room = math.min(room, cap - day_used)
end
local monthly = tonumber(ARGV[5])
if monthly >= 0 then
  if month_used >= monthly then save(); return {0, 3, 0, day_used, month_used} end
  room = math.min(room, monthly - month_used)
end
local grant = math.min(want, math.ceil(room / math.max(1, tonumber(ARGV[6]))))
add(slot, grant)
save()
if grant > 0 then
  incr(KEYS[2], grant, 172800)
  incr(KEYS[3], grant, 3456000)
end
return {grant, 0, 0, day_used + grant, month_used + grant}
