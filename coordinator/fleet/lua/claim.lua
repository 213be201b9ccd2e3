-- Add a batch of claims, bump metric counters and keep decisions, as one command. ARGV:
-- keep, n, then n (worker, count) pairs, then m, then m (hash, field, amount) triples, then
-- the decisions. Returns the new in-flight counts of the claimed workers.
-- KEYS: the inflight hash, the decisions list.
local keep = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local counts = {}
for i = 0, n - 1 do
  local worker = ARGV[3 + 2 * i]
  local count = redis.call('HINCRBY', KEYS[1], worker, tonumber(ARGV[4 + 2 * i]))
  if count == 0 then
    redis.call('HDEL', KEYS[1], worker)
  end
  counts[#counts + 1] = worker
  counts[#counts + 1] = count
end
local at = 3 + 2 * n
local m = tonumber(ARGV[at])
for i = 0, m - 1 do
  local base = at + 1 + 3 * i
  redis.call('HINCRBYFLOAT', ARGV[base], ARGV[base + 1], ARGV[base + 2])
end
local first = at + 1 + 3 * m
if keep > 0 and #ARGV >= first then
  redis.call('LPUSH', KEYS[2], unpack(ARGV, first))
  redis.call('LTRIM', KEYS[2], 0, keep - 1)
end
return counts
