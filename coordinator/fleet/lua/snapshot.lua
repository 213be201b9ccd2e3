-- One round trip for the whole fleet: live heartbeats, in-flight counts and leases. Ids
-- whose heartbeat has expired are pruned here, so the index never grows without bound, and
-- so are lapsed claims of the live workers. A heartbeat over the size limit, or a key of
-- another type, is refused here, so a huge entry never crosses the network.
-- KEYS: the workers set, the leases hash. ARGV: the heartbeat key prefix, the claims key
-- prefix, the early releases key prefix, now (unix s), the down key prefix, the largest
-- heartbeat in bytes. Returns {id, heartbeat, ...}, {id, in-flight count, ...}, leases,
-- {id, service, until, ...}, {id, why refused, ...}.
local ids = redis.call('SMEMBERS', KEYS[1])
local limit = tonumber(ARGV[6])
local beats, flight, down, refused = {}, {}, {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local size = redis.pcall('STRLEN', key)
  if type(size) == 'number' and size == 0 and redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    if type(size) ~= 'number' then
      refused[#refused + 1] = id
      refused[#refused + 1] = 'not a string'
    elseif size > limit then
      refused[#refused + 1] = id
      refused[#refused + 1] = size .. ' bytes is over ' .. limit
    else
      beats[#beats + 1] = id
      beats[#beats + 1] = redis.call('GET', key)
    end
    local claims = ARGV[2] .. id
    -- pcall: a key of the wrong type (written by anyone with access) counts as no claims
    -- rather than failing every router's snapshot.
    redis.pcall('ZREMRANGEBYSCORE', claims, '-inf', '(' .. ARGV[4])
    redis.pcall('ZREMRANGEBYSCORE', ARGV[3] .. id, '-inf', '(' .. ARGV[4])
    local count = redis.pcall('ZCARD', claims)
    if type(count) == 'number' and count > 0 then
      flight[#flight + 1] = id
      flight[#flight + 1] = count
    end
    local marks = redis.pcall('HGETALL', ARGV[5] .. id)
    if type(marks) == 'table' and not marks.err then
      for i = 1, #marks, 2 do
        down[#down + 1] = id
        down[#down + 1] = marks[i]
        down[#down + 1] = marks[i + 1]
      end
    end
  end
end
return {beats, flight, redis.call('HGETALL', KEYS[2]), down, refused}
