-- Add a batch of claims, count the models asked for, bump metric counters and keep
-- decisions, as one command. A claim already released (see release.lua) is not added; its
-- tombstone stays until it lapses, so a batch written twice (a client timeout after the
-- server applied it) cannot bring it back. The claimed workers' change counters move (see
-- snapshot.lua). Demand is each model's request rate over every publisher, decayed with
-- time constant tau: rate * exp(-elapsed / tau) + requests / tau.
-- KEYS: the decisions list, the change counter, the changes zset, the demand hash.
-- ARGV: keep, the claims key prefix, the early releases key prefix, the claims' lapse
-- time (unix s), now (unix s), tau (s), n, then n (worker, k, k claim ids) groups, then d,
-- then d (model, requests) pairs, then m, then m (hash, field, amount) triples, then the
-- decisions. Returns the new in-flight counts of the claimed workers.
local keep = tonumber(ARGV[1])
local prefix, released, lapse = ARGV[2], ARGV[3], ARGV[4]
local now, tau = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local at = 8
local counts = {}
local seq = n > 0 and redis.call('INCR', KEYS[2]) or 0
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
  redis.call('ZADD', KEYS[3], seq, worker)
  counts[#counts + 1] = worker
  counts[#counts + 1] = redis.call('ZCARD', key)
  at = at + 2 + k
end
local d = tonumber(ARGV[at])
for i = 0, d - 1 do
  local model, asked = ARGV[at + 1 + 2 * i], tonumber(ARGV[at + 2 + 2 * i])
  local rate = 0
  local old = redis.pcall('HGET', KEYS[4], model)
  if type(old) == 'string' then
    local r, t = string.match(old, '^(%S+) (%S+)$')
    r, t = tonumber(r), tonumber(t)
    if r and t then
      rate = r * math.exp(-math.max(0, now - t) / tau)
    end
  end
  redis.pcall('HSET', KEYS[4], model, string.format('%.17g %.17g', rate + asked / tau, now))
end
if d > 0 then
  -- A fleet that stops publishing leaves nothing behind for good.
  redis.pcall('EXPIRE', KEYS[4], math.ceil(tau * 20))
end
at = at + 1 + 2 * d
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
