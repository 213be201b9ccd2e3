-- Take a lease on loading a model, if the caller's view of its holders is current
-- (optimistic compare-and-set, so two routers cannot both start the first load). KEYS:
-- the leases hash. ARGV: now, model, worker, its field, its value, the hash's TTL, then
-- the holders the caller expects. Expired or unreadable entries of every model are pruned
-- on the way.
-- Returns 1 or 0 (taken or not), then the model's holders after the call as (worker,
-- ready_at) pairs.
local now, model = tonumber(ARGV[1]), ARGV[2]
local entries = redis.call('HGETALL', KEYS[1])
local holders, current = {}, 0
for i = 1, #entries, 2 do
  local ready, expires = string.match(entries[i + 1], '^(%S+) (%S+)$')
  local r, e = tonumber(ready), tonumber(expires)
  if not r or not e or r ~= r or e ~= e or math.abs(r) == math.huge or e <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    local ok, key = pcall(cjson.decode, entries[i])
    if ok and type(key) == 'table' and key[1] == model and type(key[2]) == 'string' then
      holders[key[2]] = ready
      current = current + 1
    end
  end
end
local expected = #ARGV - 6
for i = 7, #ARGV do
  if holders[ARGV[i]] == nil then
    current = -1
  end
end
local granted = 0
if current == expected then
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
  if redis.call('TTL', KEYS[1]) < tonumber(ARGV[6]) then
    redis.call('EXPIRE', KEYS[1], ARGV[6])
  end
  holders[ARGV[3]] = string.match(ARGV[5], '^(%S+)')
  granted = 1
end
local out = {granted}
for worker, ready in pairs(holders) do
  out[#out + 1] = worker
  out[#out + 1] = ready
end
return out
