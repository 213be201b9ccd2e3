-- A message's outcome releases its claim. The router writes claims in batches, so a fast
-- task may end before its claim is written: then the release is kept (a tombstone) and the
-- claim, when it comes, is not added. Releasing twice leaves one tombstone, never a count.
-- KEYS: the worker's claims, the worker's early releases. ARGV: the claim id, its lapse
-- time (unix s). Returns 1 when a written claim was released, else 0.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  return 1
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(ARGV[2]) * 1000))
return 0
