-- Add a batch of claims, bump metric counters and keep decisions, as one command.
-- A claim already released (see release.lua) is not added; its tombstone stays until it
-- lapses, so a batch written twice (a client timeout after the server applied it) cannot
-- bring it back.
-- KEYS: the decisions list. ARGV: keep, the claims key prefix, the early releases key
-- prefix, the claims' lapse time (unix s), n, then n (worker, k, k claim ids) groups, then m, then m (hash, field, amount)
-- triples, then the decisions. Returns the new in-flight counts of the claimed workers.
local keep = tonumber(ARGV[1])
local prefix, released, lapse = ARGV[2], ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local at = 6
local counts = {}
for _ = 1, n do
  local worker, k = ARGV[at], tonumber(ARGV[at + 1])
  local key, early = prefix .. worker, released .. worker
  for j = at + 2, at + 1 + k do
    if not redis.call('ZSCORE', early, ARGV[j]) then
      redis.call('ZADD', key, lapse, ARGV[j])
    end
  end
  -- The set goes with its last claim: a dead worker's is never left behind for good.
  if redis.call('EXISTS', key) == 1 then
    redis.call('PEXPIREAT', key, math.floor(tonumber(lapse) * 1000))
  end
  counts[#counts + 1] = worker
  counts[#counts + 1] = redis.call('ZCARD', key)
  at = at + 2 + k
end
local m = tonumber(ARGV[at])
for i = 0, m - 1 do
  local base = at + 1 + 3 * i
  redis.call('HINCRBYFLOAT', ARGV[base], ARGV[base + 1], ARGV[base + 2])
end
local first = at + 1 + 3 * m
if keep > 0 and #ARGV >= first then
  redis.call('LPUSH', KEYS[1], unpack(ARGV, first))
  redis.call('LTRIM', KEYS[1], 0, keep - 1)
end
return counts
