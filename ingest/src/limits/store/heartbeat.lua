-- KEYS: 1 the instances (a sorted set scored by the time of their last heartbeat)
-- ARGV: 1 the caller's now_ms, 2 the instance, 3 how long an instance counts as alive (ms),
--       4 whose clock is the time (0: the server's, 1: the caller's, for tests)
-- Time is the Redis server's (TIME), so an instance whose clock runs ahead cannot evict
-- the others.
local now = tonumber(ARGV[1])
if ARGV[4] ~= '1' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 3)
return redis.call('ZCARD', KEYS[1])
