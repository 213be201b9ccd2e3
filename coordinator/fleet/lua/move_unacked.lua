-- KEYS: unacked hash, unacked index, target list. ARGV: delivery tag, the entry as found,
-- the message rewritten ('' to drop it).
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] ~= '' then
    redis.call('LPUSH', KEYS[3], ARGV[3])
  end
  return 1
end
return 0
