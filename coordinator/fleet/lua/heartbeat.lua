-- Write one heartbeat and tell the routers: the worker's change counter moves, so their
-- next read fetches it. Lapsed claims go here too, so a lost message's count drops within
-- a heartbeat even on a worker nothing else changes.
-- KEYS: the heartbeat key, the workers set, the known hash, the change counter, the changes
-- zset, the worker's claims, the heartbeat changes zset. ARGV: the worker id, the heartbeat
-- (JSON), its TTL (ms), the known entry (JSON), now (unix s).
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.pcall('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. ARGV[5])
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZADD', KEYS[7], seq, ARGV[1])
