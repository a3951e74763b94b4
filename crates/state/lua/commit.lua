#!lua
-- chipgate commit: applies one transaction atomically, or nothing at all.
--
-- KEYS: every key the transaction touches (all in one hash slot), then its receipt key.
-- ARGV: receipt key index ('0' = no receipt), receipt ttl in ms, number of guards, number of ops,
-- then each guard and each op as a flat list:
--   guard  v <keyidx> <version>     record at key has this version ('0' = absent)
--   guard  f <keyidx> <token>       fence: stored token <= token; token is stored on success
--   guard  l <keyidx> <token>       lease at key is held with token
--   guard  h <keyidx> <field>       the hash at key has no field <field>
--   guard  abs <keyidx> <n> <keyidx1> ... <keyidxn>
--                                   no record at any of the n keys (keyidx repeats the first), checked
--                                   with one EXISTS (the client sends consecutive absence guards as
--                                   one run)
--   guard  hvs <keyidx> <n> <field1> <version1> ... <fieldn> <versionn>
--                                   field <fieldi> of the hash at key holds a record
--                                   '<versioni>:<data>' of that version ('0' = no such field), for
--                                   each i, read with one HMGET (the client sends consecutive
--                                   field guards of a hash as one run)
--   op     put <keyidx> <ttl_ms> <data>            ttl_ms '0' = no expiry; version is bumped
--   op     putat <keyidx> <version>:<data>         version known from the transaction's guard,
--                                                  sent as the stored value itself
--   op     putatpx <keyidx> <ttl_ms> <version>:<data>   the same, expiring after ttl_ms
--   op     del <keyidx>
--   op     zadds <keyidx> <n> <score1> <member1> ... <scoren> <membern>
--          n adds to one sorted set (the client sends consecutive writes of a set as runs, before
--          any op that reads or deletes sorted sets: see script_steps in redis_backend.rs)
--   op     zrems <keyidx> <n> <member1> ... <membern>
--   op     zremstamp <keyidx> <n> <m1> ... <mn> <hashidx> <field> <value>
--          removes the members; if any was there, sets hash field <field> to <value>
--   op     zunion <keyidx> <n> <srcidx1> ... <srcidxn> <hashidx> <field>
--          dest := union of the sources (n = 0: delete); its size goes into hash field <field>
--          unless hashidx is 0
--   op     zcopypage <keyidx> <srcidx> <upto> <limit> <hashidx> <field> <proghashidx> <progfield>
--          dest += the next page of src: members scored above the cursor in hash field <progfield>
--          (absent: from the lowest) and at most <upto>, lowest first, at most <limit>; hash field
--          <field> is increased by the members new to dest; the cursor becomes '>' and the last score
--          copied, or 'done' when the page held fewer than <limit> (a done copy copies nothing)
--   op     hincr <keyidx> <field> <delta>
--   op     hsets <keyidx> <n> <field1> <value1> ... <fieldn> <valuen>
--          n fields of one hash set with one HSET (the client sends consecutive sets of a hash as
--          one run)
--   op     hsetx <keyidx> <field> <value> <at_ms>  hset, then the hash expires at <at_ms> (unix ms)
--   op     hdel <keyidx> <field>
--   op     sadd <keyidx> <member>
--   op     srem <keyidx> <member>
--   op     xadd <keyidx> <maxlen> <nfields> <f1> <v1> ...   maxlen '0' = uncapped
--   op     xtrim <keyidx> <minid>                  removes entries with ids below minid (exactly)
--   op     alink <streamidx> <headidx> <seq> <prev> <hash> <entry>   audit entry, linked by the caller
-- Returns {'ok', result...} (one result per xadd: the id; per alink: '<seq>:<hash>'),
-- or {'conflict'|'fenced'|'lease', key} when a guard fails (nothing changed),
-- or {'dup', result...} when the receipt shows this very transaction already applied.
--
-- Receipts: a client may send the same script twice (the cluster client re-sends a command after
-- a reconnect, without knowing whether the first copy ran). Version guards alone would answer the
-- second copy 'conflict', and blind ops (hincr, xadd, put) would apply twice. So a transaction that
-- applies stores its results under its receipt key (unique per transaction, in the same slot, with
-- a short TTL), and a copy that finds the receipt changes nothing and answers the same results.
-- The receipt is written in the same atomic step as the changes, so it is replicated with them:
-- after a failover either both survived or neither did. A transaction that creates a record under
-- a must-not-exist guard (a record, or a hash field) may go without a receipt (index '0',
-- Txn::without_receipt): its second copy fails that guard and changes nothing, and the client tells
-- its own first copy by the record.
--
-- Records are strings '<version>:<data>'. Versions stay far below 2^53, so Lua numbers hold them
-- exactly; they are formatted with %.0f to avoid Lua's exponent notation.

-- The version of the record at k ('0' when absent). Reads only the head of the value: the version
-- is at most 16 digits and a colon, and copying a whole record (an order with its history is ~1 KB)
-- into Lua for every guard was measurable work in large batches.
local function version_at(k)
  local head = redis.call('GETRANGE', k, 0, 23)
  return string.match(head, '^(%d+):') or '0'
end

local receipt, receipt_ttl = nil, ARGV[2]
if ARGV[1] ~= '0' then
  receipt = KEYS[tonumber(ARGV[1])]
  local done = redis.call('GET', receipt)
  if done then
    -- Touch the receipt: a write, so that a WAIT after this copy (on a connection that may not have
    -- sent the first) waits for replicas to have everything up to here, the first copy included.
    redis.call('PEXPIRE', receipt, receipt_ttl)
    local out = {'dup'}
    for r in string.gmatch(done, '[^\n]+') do
      if r ~= 'ok' then out[#out + 1] = r end
    end
    return out
  end
end

-- unpack() is bounded by Lua's C stack (LUAI_MAXCSTACK, 8000 values): at most 4000 per call.
local CHUNK = 4000

local ng, no = tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
local fences = {}

for _ = 1, ng do
  local kind, k, want = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  i = i + 3
  if kind == 'v' then
    -- Most guards hold: the value starts with '<want>:', which a read of that many bytes shows
    -- without a pattern match. Anything else is decided exactly as version_at reads it.
    local head = redis.call('GETRANGE', k, 0, #want)
    if head ~= want .. ':' then
      if head == '' then
        if want ~= '0' then return {'conflict', k} end
      elseif version_at(k) ~= want then
        return {'conflict', k}
      end
    end
  elseif kind == 'f' then
    local cur = redis.call('GET', k)
    if cur and tonumber(cur) > tonumber(want) then return {'fenced', k} end
    fences[#fences + 1] = {k, want}
  elseif kind == 'l' then
    if redis.call('GET', k) ~= want then return {'lease', k} end
  elseif kind == 'h' then
    if redis.call('HEXISTS', k, want) == 1 then return {'conflict', k} end
  elseif kind == 'abs' then
    -- want is the number of key indexes that follow. The common case, all absent, costs one call;
    -- otherwise the first present key in the run's order is the conflict.
    local n = tonumber(want)
    local j0 = i
    while j0 < i + n do
      local j1 = math.min(i + n - 1, j0 + CHUNK - 1)
      local ks = {}
      for j = j0, j1 do ks[#ks + 1] = KEYS[tonumber(ARGV[j])] end
      if redis.call('EXISTS', unpack(ks)) > 0 then
        for _, present in ipairs(ks) do
          if redis.call('EXISTS', present) == 1 then return {'conflict', present} end
        end
      end
      j0 = j1 + 1
    end
    i = i + n
  elseif kind == 'hvs' then
    -- want is the number of (field, version) pairs that follow.
    local n = tonumber(want)
    local j0 = i
    while j0 < i + 2 * n do
      local j1 = math.min(i + 2 * n - 1, j0 + CHUNK - 1)
      local fields = {}
      for j = j0, j1, 2 do fields[#fields + 1] = ARGV[j] end
      local cur = redis.call('HMGET', k, unpack(fields))
      for x = 1, #fields do
        local have = '0'
        local v = cur[x]
        if v then have = string.match(v, '^(%d+):') or '' end
        if have ~= ARGV[j0 + 2 * x - 1] then return {'conflict', k} end
      end
      j0 = j1 + 1
    end
    i = i + 2 * n
  else
    return redis.error_reply('chipgate commit: unknown guard ' .. tostring(kind))
  end
end

for _, fk in ipairs(fences) do
  redis.call('SET', fk[1], fk[2])
end

-- Record writes at a known version (putat) are batched into MSETs: a wave's commit writes one
-- record per order, and each redis.call costs a command lookup and argument conversion. They are
-- flushed before every op that reads or writes a key's value otherwise (put reads the version;
-- putatpx, del, alink and zunion overwrite), so each key ends as if the ops ran one by one.
local sets = {}
local function sflush()
  local n = #sets
  local i0 = 1
  while i0 <= n do
    local i1 = math.min(n, i0 + CHUNK - 1)
    redis.call('MSET', unpack(sets, i0, i1))
    i0 = i1 + 1
  end
  sets = {}
end

-- Adds the members of a ZRANGE ... WITHSCORES reply to the sorted set at k, each with its score,
-- in ZADD calls below unpack's bound; returns how many were new to it.
local function zadd_flat(k, flat)
  local args, count = {}, 0
  for x = 1, #flat, 2 do
    args[#args + 1] = flat[x + 1]
    args[#args + 1] = flat[x]
    if #args >= CHUNK then
      count = count + redis.call('ZADD', k, unpack(args))
      args = {}
    end
  end
  if #args > 0 then
    count = count + redis.call('ZADD', k, unpack(args))
  end
  return count
end

local out = {'ok'}
for _ = 1, no do
  local kind, k = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if kind == 'putat' then
    sets[#sets + 1] = k
    sets[#sets + 1] = ARGV[i + 2]
    i = i + 3
  elseif kind == 'put' then
    sflush()
    local ver = tonumber(version_at(k)) + 1
    local val = string.format('%.0f', ver) .. ':' .. ARGV[i + 3]
    if ARGV[i + 2] ~= '0' then
      redis.call('SET', k, val, 'PX', ARGV[i + 2])
    else
      redis.call('SET', k, val)
    end
    i = i + 4
  elseif kind == 'putatpx' then
    sflush()
    redis.call('SET', k, ARGV[i + 3], 'PX', ARGV[i + 2])
    i = i + 4
  elseif kind == 'del' then
    sflush()
    redis.call('DEL', k)
    i = i + 2
  elseif kind == 'zadds' or kind == 'zrems' then
    -- A run of one sorted set's adds (score, member pairs) or removals, as the client grouped them.
    local n = tonumber(ARGV[i + 2])
    local first, last = i + 3, i + 2 + (kind == 'zadds' and 2 * n or n)
    local cmd = (kind == 'zadds') and 'ZADD' or 'ZREM'
    while first <= last do
      local upto = math.min(last, first + CHUNK - 1)
      redis.call(cmd, k, unpack(ARGV, first, upto))
      first = upto + 1
    end
    i = last + 1
  elseif kind == 'zremstamp' then
    local n = tonumber(ARGV[i + 2])
    local removed, j0 = 0, i + 3
    while j0 < i + 3 + n do
      local j1 = math.min(i + 2 + n, j0 + CHUNK - 1)
      removed = removed + redis.call('ZREM', k, unpack(ARGV, j0, j1))
      j0 = j1 + 1
    end
    if removed > 0 then
      redis.call('HSET', KEYS[tonumber(ARGV[i + 3 + n])], ARGV[i + 4 + n], ARGV[i + 5 + n])
    end
    i = i + 6 + n
  elseif kind == 'zunion' then
    sflush()
    local n = tonumber(ARGV[i + 2])
    local srcs = {}
    for j = 1, n do
      srcs[j] = KEYS[tonumber(ARGV[i + 2 + j])]
    end
    local size = 0
    if n > 0 then
      size = redis.call('ZUNIONSTORE', k, n, unpack(srcs))
    else
      redis.call('DEL', k)
    end
    local hidx = ARGV[i + 3 + n]
    if hidx ~= '0' then
      redis.call('HSET', KEYS[tonumber(hidx)], ARGV[i + 4 + n], size)
    end
    i = i + 5 + n
  elseif kind == 'zcopypage' then
    local src, upto, limit = KEYS[tonumber(ARGV[i + 2])], ARGV[i + 3], tonumber(ARGV[i + 4])
    local hash, field = KEYS[tonumber(ARGV[i + 5])], ARGV[i + 6]
    local prog, pfield = KEYS[tonumber(ARGV[i + 7])], ARGV[i + 8]
    local cursor = redis.call('HGET', prog, pfield)
    if cursor ~= 'done' then
      local from = '-inf'
      if cursor and string.sub(cursor, 1, 1) == '>' then from = '(' .. string.sub(cursor, 2) end
      local flat = redis.call('ZRANGE', src, from, upto, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
      redis.call('HINCRBY', hash, field, zadd_flat(k, flat))
      local n = #flat / 2
      if n >= limit then
        redis.call('HSET', prog, pfield, '>' .. flat[#flat])
      else
        redis.call('HSET', prog, pfield, 'done')
      end
    end
    i = i + 9
  elseif kind == 'hincr' then
    redis.call('HINCRBY', k, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif kind == 'hsets' then
    -- Pairs never split across calls: CHUNK is even, and the first pair starts the first call.
    local n = tonumber(ARGV[i + 2])
    local first, last = i + 3, i + 2 + 2 * n
    while first <= last do
      local upto = math.min(last, first + CHUNK - 1)
      redis.call('HSET', k, unpack(ARGV, first, upto))
      first = upto + 1
    end
    i = last + 1
  elseif kind == 'hsetx' then
    redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3])
    redis.call('PEXPIREAT', k, ARGV[i + 4])
    i = i + 5
  elseif kind == 'hdel' then
    redis.call('HDEL', k, ARGV[i + 2])
    i = i + 3
  elseif kind == 'sadd' then
    redis.call('SADD', k, ARGV[i + 2])
    i = i + 3
  elseif kind == 'srem' then
    redis.call('SREM', k, ARGV[i + 2])
    i = i + 3
  elseif kind == 'xadd' then
    local maxlen, nf = ARGV[i + 2], tonumber(ARGV[i + 3])
    local args = {k}
    if maxlen ~= '0' then
      args[#args + 1] = 'MAXLEN'
      args[#args + 1] = '~'
      args[#args + 1] = maxlen
    end
    args[#args + 1] = '*'
    for j = 0, 2 * nf - 1 do
      args[#args + 1] = ARGV[i + 4 + j]
    end
    out[#out + 1] = redis.call('XADD', unpack(args))
    i = i + 4 + 2 * nf
  elseif kind == 'xtrim' then
    redis.call('XTRIM', k, 'MINID', ARGV[i + 2])
    i = i + 3
  elseif kind == 'alink' then
    -- The hash was computed by the caller against the head this transaction guards (a version
    -- guard on the head key), so appending it here keeps the chain intact without hashing in Redis.
    sflush()
    local head = KEYS[tonumber(ARGV[i + 2])]
    local seqs, prev, hash, entry = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
    redis.call('XADD', k, '*', 'seq', seqs, 'prev', prev, 'hash', hash, 'entry', entry)
    redis.call('SET', head, seqs .. ':' .. hash)
    out[#out + 1] = seqs .. ':' .. hash
    i = i + 7
  else
    return redis.error_reply('chipgate commit: unknown op ' .. tostring(kind))
  end
end
sflush()

if receipt then
  redis.call('SET', receipt, table.concat(out, '\n'), 'PX', receipt_ttl)
end
return out
