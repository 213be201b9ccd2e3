-- KEYS: source list, target list. ARGV: the message as found, the message rewritten ('' to
-- drop it). LREM takes exactly that message or nothing: two reapers cannot both move it.
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  if ARGV[2] ~= '' then
    redis.call('LPUSH', KEYS[2], ARGV[2])
  end
  return 1
end
return 0
