-- Work stealing's one look per interval (coordinator/recovery/stealing.py): a worker posts
-- how many messages wait in its own queue on the backlog board (none: it leaves the
-- board) and, when it is idle with nothing waiting, reads the longest backlogs. Constant
-- work whatever the fleet's size: an idle fleet costs one call per worker per interval.
-- KEYS: the worker's queue, the backlog board (zset worker_id -> messages waiting).
-- ARGV: the worker id, how many backlogs to return (0: none), how long the board outlives
-- its last post (ms). Returns {messages waiting in the worker's queue, {id, count, ...}}.
local waiting = redis.call('LLEN', KEYS[1])
if waiting > 0 then
  redis.call('ZADD', KEYS[2], waiting, ARGV[1])
  -- A fleet that stops leaves no board behind: its last post expires it.
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local top = {}
local n = tonumber(ARGV[2])
if n > 0 and waiting == 0 then
  top = redis.call('ZREVRANGE', KEYS[2], 0, n - 1, 'WITHSCORES')
end
return {waiting, top}
