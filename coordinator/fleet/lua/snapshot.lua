-- One round trip for the whole fleet: live heartbeats, in-flight counts and leases. Ids
-- whose heartbeat has expired are pruned here, so the index never grows without bound.
-- KEYS: the workers set, the inflight hash, the leases hash. ARGV: the heartbeat key prefix.
local ids = redis.call('SMEMBERS', KEYS[1])
local beats = {}
for _, id in ipairs(ids) do
  local raw = redis.call('GET', ARGV[1] .. id)
  if raw then
    beats[#beats + 1] = id
    beats[#beats + 1] = raw
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return {beats, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
