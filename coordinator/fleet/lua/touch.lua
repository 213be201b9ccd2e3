-- Tell the routers that these workers changed (a departure, a service marked unreachable
-- or back): their next read fetches them.
-- KEYS: the change counter, the changes zset. ARGV: the worker ids.
local seq = redis.call('INCR', KEYS[1])
for _, id in ipairs(ARGV) do
  redis.call('ZADD', KEYS[2], seq, id)
end
