-- Live heartbeats, in-flight counts, down marks, leases and demand, in one round trip: of
-- every worker (a full read) or only of the workers changed since a router's last read
-- (see heartbeat.lua and touch.lua), so a router's refresh costs what changed, not the
-- fleet. A full read prunes the ids whose heartbeat has expired, so the index never grows
-- without bound; every read prunes the lapsed claims of the workers it reads. A heartbeat
-- over the size limit, or a key of another type, is refused here, so a huge entry never
-- crosses the network.
-- KEYS: the workers set, the leases hash, the change counter, the changes zset, the demand
-- hash, the heartbeat changes zset (a changed worker's heartbeat is sent only when new).
-- ARGV: the heartbeat key prefix, the claims key prefix, the early releases key prefix, now
-- (unix s), the down key prefix, the largest heartbeat in bytes, 'all' or the change
-- counter last read. Returns the change counter, {id, heartbeat, ms to live,
-- counted (1: its writes move the counters), ...},
-- {id, in-flight count, ...}, leases, {id, service, until, ...}, {id, why refused, ...},
-- {id gone, ...}, demand.
local seq = tonumber(redis.call('GET', KEYS[3]) or '0')
local full = ARGV[7] == 'all'
local ids
if full then
  ids = redis.call('SMEMBERS', KEYS[1])
elseif tonumber(ARGV[7]) >= seq then
  ids = {}
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. ARGV[7], '+inf')
end
local limit = tonumber(ARGV[6])
local beats, flight, down, refused, gone = {}, {}, {}, {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local size = redis.pcall('STRLEN', key)
  if type(size) == 'number' and size == 0 and redis.call('EXISTS', key) == 0 then
    if full then
      redis.call('SREM', KEYS[1], id)
    end
    gone[#gone + 1] = id
  else
    if type(size) ~= 'number' then
      refused[#refused + 1] = id
      refused[#refused + 1] = 'not a string'
    elseif size > limit then
      refused[#refused + 1] = id
      refused[#refused + 1] = size .. ' bytes is over ' .. limit
    elseif full or tonumber(redis.call('ZSCORE', KEYS[6], id) or '0') > tonumber(ARGV[7]) then
      beats[#beats + 1] = id
      beats[#beats + 1] = redis.call('GET', key)
      beats[#beats + 1] = redis.call('PTTL', key)
      -- 0: written without moving a counter (a worker of an older version), so a router
      -- must not expire it on its own clock: it would miss the renewals.
      beats[#beats + 1] = redis.call('ZSCORE', KEYS[6], id) and 1 or 0
    end
    local claims = ARGV[2] .. id
    -- pcall: a key of the wrong type (written by anyone with access) counts as no claims
    -- rather than failing every router's snapshot.
    local lapsed = redis.pcall('ZREMRANGEBYSCORE', claims, '-inf', '(' .. ARGV[4])
    if type(lapsed) == 'number' and lapsed > 0 then
      redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), id)  -- the others' counts fall
    end
    redis.pcall('ZREMRANGEBYSCORE', ARGV[3] .. id, '-inf', '(' .. ARGV[4])
    local count = redis.pcall('ZCARD', claims)
    flight[#flight + 1] = id
    flight[#flight + 1] = type(count) == 'number' and count or 0
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
local leases = redis.pcall('HGETALL', KEYS[2])
local demand = redis.pcall('HGETALL', KEYS[5])
if type(leases) ~= 'table' or leases.err then leases = {} end
if type(demand) ~= 'table' or demand.err then demand = {} end
if full then
  -- A model nobody asked for in an hour has no demand left to speak of.
  for i = 1, #demand, 2 do
    local t = tonumber(string.match(demand[i + 1], ' (%S+)$') or '')
    if not t or t < tonumber(ARGV[4]) - 3600 then
      redis.call('HDEL', KEYS[5], demand[i])
    end
  end
end
return {seq, beats, flight, leases, down, refused, gone, demand}
