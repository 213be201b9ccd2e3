-- A message's outcome releases its claim. The router writes claims in batches, so a fast
-- task may end before its claim is written: then the release is kept (a tombstone) and the
-- claim, when it comes, is not added. Releasing twice leaves one tombstone, never a count.
-- A release that drops a count moves the worker's change counter (see snapshot.lua).
-- KEYS: the worker's claims, the worker's early releases, the change counter, the changes
-- zset. ARGV: the claim id, its lapse time (unix s), the worker id. Returns 1 when a
-- written claim was released, else 0.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), ARGV[3])
  return 1
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(ARGV[2]) * 1000))
return 0
