#!lua
-- chipgate commit: applies one transaction atomically, or nothing at all.
--
-- KEYS: every key the transaction touches (all in one hash slot).
-- ARGV: number of guards, number of ops, then each guard and each op as a flat list:
--   guard  v <keyidx> <version>     record at key has this version ('0' = absent)
--   guard  f <keyidx> <token>       fence: stored token <= token; token is stored on success
--   guard  l <keyidx> <token>       lease at key is held with token
--   op     put <keyidx> <ttl_ms> <data>            ttl_ms '0' = no expiry; version is bumped
--   op     del <keyidx>
--   op     zadd <keyidx> <score> <member>
--   op     zrem <keyidx> <member>
--   op     hincr <keyidx> <field> <delta>
--   op     hset <keyidx> <field> <value>
--   op     hdel <keyidx> <field>
--   op     sadd <keyidx> <member>
--   op     srem <keyidx> <member>
--   op     xadd <keyidx> <maxlen> <nfields> <f1> <v1> ...   maxlen '0' = uncapped
--   op     audit <streamidx> <headidx> <digest_hex> <entry>
-- Returns {'ok', result...} (one result per xadd: the id; per audit: '<seq>:<hash>'),
-- or {'conflict'|'fenced'|'lease', key} when a guard fails (nothing changed).
--
-- Records are strings '<version>:<data>'. Versions stay far below 2^53, so Lua numbers hold them
-- exactly; they are formatted with %.0f to avoid Lua's exponent notation.

local function version_of(v)
  if not v then return '0' end
  return string.match(v, '^(%d+):') or '0'
end

-- SHA-256 over a binary string, with LuaBitOp (bundled with Redis). Used only for the audit chain
-- link: SHA-256(prev_hash || entry_digest), a fixed 64-byte input.
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

local function sha256(msg)
  local ml = #msg
  local bits = ml * 8
  local hi, lo = math.floor(bits / 4294967296), bits % 4294967296
  msg = msg .. '\128' .. string.rep('\0', (55 - ml) % 64)
    .. string.char(band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255),
                   band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
  local h0, h1, h2, h3 = 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a
  local h4, h5, h6, h7 = 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  local w = {}
  for chunk = 1, #msg, 64 do
    for j = 0, 15 do
      local a, b, c, d = string.byte(msg, chunk + j * 4, chunk + j * 4 + 3)
      w[j] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for j = 16, 63 do
      local v15, v2 = w[j - 15], w[j - 2]
      local s0 = bxor(ror(v15, 7), ror(v15, 18), rshift(v15, 3))
      local s1 = bxor(ror(v2, 17), ror(v2, 19), rshift(v2, 10))
      w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for j = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = h + S1 + ch + K[j + 1] + w[j]
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return bit.tohex(h0, 8) .. bit.tohex(h1, 8) .. bit.tohex(h2, 8) .. bit.tohex(h3, 8)
      .. bit.tohex(h4, 8) .. bit.tohex(h5, 8) .. bit.tohex(h6, 8) .. bit.tohex(h7, 8)
end

local function unhex(s)
  return (string.gsub(s, '..', function(cc) return string.char(tonumber(cc, 16)) end))
end

local ng, no = tonumber(ARGV[1]), tonumber(ARGV[2])
local i = 3
local fences = {}

for _ = 1, ng do
  local kind, k, want = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  i = i + 3
  if kind == 'v' then
    if version_of(redis.call('GET', k)) ~= want then return {'conflict', k} end
  elseif kind == 'f' then
    local cur = redis.call('GET', k)
    if cur and tonumber(cur) > tonumber(want) then return {'fenced', k} end
    fences[#fences + 1] = {k, want}
  elseif kind == 'l' then
    if redis.call('GET', k) ~= want then return {'lease', k} end
  else
    return redis.error_reply('chipgate commit: unknown guard ' .. tostring(kind))
  end
end

for _, fk in ipairs(fences) do
  redis.call('SET', fk[1], fk[2])
end

local out = {'ok'}
for _ = 1, no do
  local kind, k = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if kind == 'put' then
    local ver = tonumber(version_of(redis.call('GET', k))) + 1
    local val = string.format('%.0f', ver) .. ':' .. ARGV[i + 3]
    if ARGV[i + 2] ~= '0' then
      redis.call('SET', k, val, 'PX', ARGV[i + 2])
    else
      redis.call('SET', k, val)
    end
    i = i + 4
  elseif kind == 'del' then
    redis.call('DEL', k)
    i = i + 2
  elseif kind == 'zadd' then
    redis.call('ZADD', k, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif kind == 'zrem' then
    redis.call('ZREM', k, ARGV[i + 2])
    i = i + 3
  elseif kind == 'hincr' then
    redis.call('HINCRBY', k, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif kind == 'hset' then
    redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
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
  elseif kind == 'audit' then
    local head = KEYS[tonumber(ARGV[i + 2])]
    local digest, entry = ARGV[i + 3], ARGV[i + 4]
    local cur = redis.call('GET', head)
    local seq, prev = 0, string.rep('0', 64)
    if cur then
      local s, h = string.match(cur, '^(%d+):(%x+)$')
      seq, prev = tonumber(s), h
    end
    seq = seq + 1
    local hash = sha256(unhex(prev) .. unhex(digest))
    local seqs = string.format('%.0f', seq)
    redis.call('XADD', k, '*', 'seq', seqs, 'prev', prev, 'hash', hash, 'entry', entry)
    redis.call('SET', head, seqs .. ':' .. hash)
    out[#out + 1] = seqs .. ':' .. hash
    i = i + 5
  else
    return redis.error_reply('chipgate commit: unknown op ' .. tostring(kind))
  end
end

return out
