-- A finished task releases its claim. A count at zero is deleted to keep the hash small; it
-- may dip below zero while the claim is still buffered in its publisher.
-- KEYS: the inflight hash. ARGV: the worker id.
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return left
