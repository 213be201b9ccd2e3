-- Moves one waiting message from a busy worker's queue to the consuming end of a thief's
-- own queue (it is popped next), with its claim, in one step: LREM takes exactly that
-- message or nothing, so a message is never lost nor doubled, and two thieves (or a thief
-- and the reaper, or the owner's own pop) never both take it.
-- The claim moves from its owner's in-flight set to the thief's, so the routers count the
-- message against the worker that will run it and the thief's release (by the id in the
-- rewritten header) finds it. A claim not written yet (its router's batch is on the way)
-- leaves a tombstone, as release.lua does, so the batch does not add it to the owner.
-- KEYS: the source queue, the thief's queue, the claim owner's claims, the owner's early
-- releases, the thief's claims, the fleet's change counter and changes zset (routers that
-- read only changed workers re-read both). ARGV: the message as found, the message
-- rewritten, the claim id, the owner's id, the thief's id, the
-- thief's claim lapse (unix s), the same from now (ms), the tombstone lapse (unix s).
-- Returns 1 when moved, 0 when the message was gone.
if redis.call('LREM', KEYS[1], -1, ARGV[1]) ~= 1 then
  return 0
end
if redis.call('ZREM', KEYS[3], ARGV[3]) == 0 then
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[3])
  redis.call('PEXPIREAT', KEYS[4], math.floor(tonumber(ARGV[8]) * 1000))
end
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3])
-- The set goes with its last claim, never before it (-1: no expiry yet).
if redis.call('PTTL', KEYS[5]) < tonumber(ARGV[7]) then
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
end
local seq = redis.call('INCR', KEYS[6])
redis.call('ZADD', KEYS[7], seq, ARGV[4])
redis.call('ZADD', KEYS[7], seq, ARGV[5])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
