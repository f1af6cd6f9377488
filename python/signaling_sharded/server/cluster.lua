#!lua name=signaling_sharded_1
--[[
Presence of cluster mode, as Redis functions (Redis 7.0+). Every change to a
topic's members goes through one of these, so that it is atomic: it changes
the members, gives the topic a new version and publishes the change, with
that version, to the inbox of every other node holding members of the topic.
Redis runs one function at a time and delivers what each published in that
order, so every node sees a topic's changes in one order, and a snapshot
(the members at version v) is exact.

Keys, under the cluster's prefix P:
  P t:{topic}  hash   peer id -> node .. "\n" .. metadata JSON ("" for none)
  P e:{topic}  zset   peer id -> expiry (ms); the owner refreshes it
  P c:{topic}  hash   node -> its member count; "~v" -> the topic's version
  P n:{node}   set    the topics where node has members
  P topics     zset   every topic with members, all scores 0 (the admin
                      API's listing, in order of name)
A topic's keys are deleted with its last member. Every key also expires on
its own (TTL) unless refreshed, so a cluster whose nodes all died leaves
nothing behind. Versions are Redis' clock in microseconds, made strictly
increasing per topic, so they also increase across a topic's deletion.

Moving a resumable session between nodes: `ask` and `move` (the messages
they publish are described in the Rust core's wire/migrate.rs).

Presence event (published):
  {"topic":..,"v":..,"joined":[[peer,node,metadata|null],..],"left":[peer,..]}
with "dead":true added when the peers left because their node died.

Arguments common to every function: P (prefix), then the function's own.

Webhooks (PROTOCOL.md section 11) number a topic's events with its
versions: a change with n events takes n versions (`bump`), which the
caller's node gives out in this order: topic.opened, the peer.left, the
peer.joined, topic.closed. So `join`, `leave` and `sync` reply with a
change: flat, the version (the last taken), the first version taken,
opened (0/1), closed (0/1), the number of peers that left and each as
peer, node; the number that joined and each peer. `join` (when asked) and
`sync` add the snapshot: peer, node, metadata per member of other nodes.
]]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function keys_of(p, topic)
  return p .. 't:' .. topic, p .. 'e:' .. topic, p .. 'c:' .. topic
end

local function number(v)
  return string.format('%.0f', v)
end

local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Takes the topic's next `n` versions (one if nil): the clock in us,
-- above the last one. Returns the last version taken, then the first.
local function bump(p, topic, n)
  local _, _, ck = keys_of(p, topic)
  local v = clock_us()
  local last = tonumber(redis.call('HGET', ck, '~v') or redis.call('GET', p .. 's:' .. topic) or '0')
  if v <= last then
    v = last + 1
  end
  local top = v + (n or 1) - 1
  redis.call('HSET', ck, '~v', number(top))
  return top, v
end

local function split(value)
  local cut = string.find(value, '\n', 1, true)
  return string.sub(value, 1, cut - 1), string.sub(value, cut + 1)
end

local function joined_entry(peer, node, meta)
  if meta == '' then
    meta = 'null'
  end
  return '[' .. cjson.encode(peer) .. ',' .. cjson.encode(node) .. ',' .. meta .. ']'
end

-- Adds a member; true if it was not there yet.
local function add(p, topic, peer, node, meta, expiry, ttl)
  local tk, ek, ck = keys_of(p, topic)
  local added = redis.call('HSETNX', tk, peer, node .. '\n' .. meta) == 1
  if added and redis.call('HINCRBY', ck, node, 1) == 1 then
    redis.call('SADD', p .. 'n:' .. node, topic)
    redis.call('PEXPIRE', p .. 'n:' .. node, ttl)
    redis.call('ZADD', p .. 'topics', 0, topic)
    redis.call('PEXPIRE', p .. 'topics', ttl)
  end
  redis.call('ZADD', ek, expiry, peer)
  return added
end

-- Removes a member; its node, or nil if it was not there.
local function remove(p, topic, peer)
  local tk, ek, ck = keys_of(p, topic)
  local value = redis.call('HGET', tk, peer)
  redis.call('ZREM', ek, peer)
  if not value then
    return nil
  end
  local node = split(value)
  redis.call('HDEL', tk, peer)
  if redis.call('HINCRBY', ck, node, -1) <= 0 then
    redis.call('HDEL', ck, node)
    redis.call('SREM', p .. 'n:' .. node, topic)
  end
  return node
end

-- Removes the members whose expiry has passed; appends them to `left`
-- (as JSON) and to `gone` (peer, node).
local function prune(p, topic, now, left, gone)
  local _, ek = keys_of(p, topic)
  for _, peer in ipairs(redis.call('ZRANGEBYSCORE', ek, '-inf', now)) do
    local node = remove(p, topic, peer)
    if node then
      table.insert(left, cjson.encode(peer))
      table.insert(gone, peer)
      table.insert(gone, node)
    end
  end
end

-- Publishes a change to the nodes holding members of the topic but
-- `except`; `dead`: the peers left because their node died.
local function notify(p, topic, v, joined, left, except, dead)
  if #joined == 0 and #left == 0 then
    return
  end
  local _, _, ck = keys_of(p, topic)
  local event = '{"topic":' .. cjson.encode(topic) .. ',"v":' .. number(v)
    .. ',"joined":[' .. table.concat(joined, ',') .. '],"left":['
    .. table.concat(left, ',') .. ']' .. (dead and ',"dead":true}' or '}')
  for _, node in ipairs(redis.call('HKEYS', ck)) do
    if node ~= '~v' and node ~= except then
      redis.call('PUBLISH', p .. 'node:' .. node, event)
    end
  end
end

-- Deletes an empty topic's keys, or refreshes their TTL. True if it
-- deleted them. A last version still ahead of the clock (a change took
-- many) is kept (P s:{topic}) until the clock passes it, so that versions
-- increase across the deletion.
local function settle(p, topic, ttl)
  local tk, ek, ck = keys_of(p, topic)
  if redis.call('HLEN', tk) == 0 then
    local last = tonumber(redis.call('HGET', ck, '~v') or '0')
    redis.call('DEL', tk, ek, ck)
    redis.call('ZREM', p .. 'topics', topic)
    local ahead = last - clock_us()
    if ahead >= 0 then
      redis.call('SET', p .. 's:' .. topic, number(last), 'PX', math.floor(ahead / 1000) + 2)
    end
    return true
  end
  redis.call('PEXPIRE', tk, ttl)
  redis.call('PEXPIRE', ek, ttl)
  redis.call('PEXPIRE', ck, ttl)
  return false
end

-- The versions a change takes: one per event (see the top), at least one.
local function events_of(opened, left, joined, closed)
  return math.max(1, (opened and 1 or 0) + left + joined + (closed and 1 or 0))
end

-- A change's reply (see the top); `left` holds peer, node pairs.
local function change(v, first, opened, closed, left, joined)
  local out = { v, first, opened and 1 or 0, closed and 1 or 0, #left / 2 }
  for _, item in ipairs(left) do
    table.insert(out, item)
  end
  table.insert(out, #joined)
  for _, peer in ipairs(joined) do
    table.insert(out, peer)
  end
  return out
end

-- Appends the members of other nodes than `node` to `out`.
local function snapshot(p, topic, node, out)
  local tk = keys_of(p, topic)
  local all = redis.call('HGETALL', tk)
  for i = 1, #all, 2 do
    local owner, meta = split(all[i + 1])
    if owner ~= node then
      table.insert(out, all[i])
      table.insert(out, owner)
      table.insert(out, meta)
    end
  end
  return out
end

-- join(P, topic, peer, node, metadata, want_snapshot, ttl_ms)
-- A local peer of `node` joins `topic`. Returns the change, then (when
-- asked) the snapshot of the other nodes' members.
local function join(_, args)
  local p, topic, peer, node, meta, want, ttl = args[1], args[2], args[3], args[4], args[5],
    args[6] == '1', tonumber(args[7])
  local now = now_ms()
  local left, gone = {}, {}
  local opened = redis.call('EXISTS', (keys_of(p, topic))) == 0
  prune(p, topic, now, left, gone)
  local added = add(p, topic, peer, node, meta, now + ttl, ttl)
  local joined = added and { peer } or {}
  opened = opened and added
  local v, first = bump(p, topic, events_of(opened, #gone / 2, #joined, false))
  notify(p, topic, v, added and { joined_entry(peer, node, meta) } or {}, left, node)
  if #left > 0 and not want then
    -- The joiner's node follows the topic too: tell it who expired.
    local event = '{"topic":' .. cjson.encode(topic) .. ',"v":' .. number(v)
      .. ',"joined":[],"left":[' .. table.concat(left, ',') .. ']}'
    redis.call('PUBLISH', p .. 'node:' .. node, event)
  end
  settle(p, topic, ttl)
  local out = change(v, first, opened, false, gone, joined)
  if want then
    snapshot(p, topic, node, out)
  end
  return out
end

-- leave(P, topic, peer, node, ttl_ms)
-- Peer `peer` leaves `topic`: a local peer of `node`, or one that `node`
-- found gone. Returns the change (version 0 if it was not a member).
local function leave(_, args)
  local p, topic, peer, node, ttl = args[1], args[2], args[3], args[4], tonumber(args[5])
  local tk = keys_of(p, topic)
  local owner = remove(p, topic, peer)
  if not owner then
    settle(p, topic, ttl)
    return change(0, 0, false, false, {}, {})
  end
  local closed = redis.call('HLEN', tk) == 0
  local v, first = bump(p, topic, events_of(false, 1, 0, closed))
  notify(p, topic, v, {}, { cjson.encode(peer) }, node)
  settle(p, topic, ttl)
  return change(v, first, false, closed, { peer, owner }, {})
end

-- update(P, topic, peer, node, metadata, ttl_ms)
-- Local peer `peer` of `node` has new metadata ("" for none); the other
-- nodes get it as a join of a member they have (see the Rust core's
-- engine/remote.rs). Returns the change (version 0 if `node` does not
-- hold the peer).
local function update(_, args)
  local p, topic, peer, node, meta, ttl = args[1], args[2], args[3], args[4], args[5],
    tonumber(args[6])
  local tk = keys_of(p, topic)
  local value = redis.call('HGET', tk, peer)
  if not value or split(value) ~= node then
    return change(0, 0, false, false, {}, {})
  end
  redis.call('HSET', tk, peer, node .. '\n' .. meta)
  local v, first = bump(p, topic)
  notify(p, topic, v, { joined_entry(peer, node, meta) }, {}, node)
  settle(p, topic, ttl)
  return change(v, first, false, false, {}, {})
end

-- sync(P, topic, node, ttl_ms, peer1, metadata1, peer2, metadata2, ...)
-- Makes `node`'s members of `topic` exactly the given peers (after Redis
-- came back, or lost them). Returns the change, then the snapshot of the
-- other nodes' members.
local function sync(_, args)
  local p, topic, node, ttl = args[1], args[2], args[3], tonumber(args[4])
  local tk = keys_of(p, topic)
  local now = now_ms()
  local wanted = {}
  for i = 5, #args, 2 do
    wanted[args[i]] = args[i + 1]
  end
  local existed = redis.call('EXISTS', tk) == 1
  local joined, left, gone, added = {}, {}, {}, {}
  prune(p, topic, now, left, gone)
  local all = redis.call('HGETALL', tk)
  for i = 1, #all, 2 do
    local owner = split(all[i + 1])
    if owner == node and wanted[all[i]] == nil then
      remove(p, topic, all[i])
      table.insert(left, cjson.encode(all[i]))
      table.insert(gone, all[i])
      table.insert(gone, node)
    end
  end
  for peer, meta in pairs(wanted) do
    if add(p, topic, peer, node, meta, now + ttl, ttl) then
      table.insert(joined, joined_entry(peer, node, meta))
      table.insert(added, peer)
    else
      -- Its metadata changed while Redis was away: the other nodes get it
      -- as a join of a member they have (an update).
      local value = redis.call('HGET', tk, peer)
      if value and value ~= node .. '\n' .. meta and split(value) == node then
        redis.call('HSET', tk, peer, node .. '\n' .. meta)
        table.insert(joined, joined_entry(peer, node, meta))
      end
    end
  end
  local opened = not existed and #added > 0
  local closed = existed and redis.call('HLEN', tk) == 0
  local v, first = bump(p, topic, events_of(opened, #gone / 2, #added, closed))
  notify(p, topic, v, joined, left, node)
  settle(p, topic, ttl)
  local out = change(v, first, opened, closed, gone, added)
  snapshot(p, topic, node, out)
  return out
end

-- touch(P, topic, node, ttl_ms, peer1, peer2, ...)
-- Refreshes the expiry of `node`'s peers. Returns how many were missing
-- (expired or removed meanwhile): the node must then sync.
local function touch(_, args)
  local p, topic, node, ttl = args[1], args[2], args[3], tonumber(args[4])
  local tk, ek = keys_of(p, topic)
  local expiry = now_ms() + ttl
  local missing = 0
  for i = 5, #args do
    if redis.call('HEXISTS', tk, args[i]) == 1 then
      redis.call('ZADD', ek, expiry, args[i])
    else
      missing = missing + 1
    end
  end
  redis.call('PEXPIRE', p .. 'n:' .. node, ttl)
  redis.call('PEXPIRE', p .. 'topics', ttl)
  settle(p, topic, ttl)
  return missing
end

-- reap(P, node, ttl_ms, dead)
-- Removes every member of `node` (a node found dead: dead = "1", or one
-- leaving) and tells the others. Returns, per topic it had members in,
-- the topic, then the change.
local function reap(_, args)
  local p, node, ttl, dead = args[1], args[2], tonumber(args[3]), args[4] == '1'
  local out = {}
  for _, topic in ipairs(redis.call('SMEMBERS', p .. 'n:' .. node)) do
    local tk = keys_of(p, topic)
    local left, gone = {}, {}
    local all = redis.call('HGETALL', tk)
    for i = 1, #all, 2 do
      if split(all[i + 1]) == node then
        remove(p, topic, all[i])
        table.insert(left, cjson.encode(all[i]))
        table.insert(gone, all[i])
        table.insert(gone, node)
      end
    end
    if #left > 0 then
      local closed = redis.call('HLEN', tk) == 0
      local v, first = bump(p, topic, events_of(false, #left, 0, closed))
      notify(p, topic, v, {}, left, node, dead)
      table.insert(out, { topic, unpack(change(v, first, false, closed, gone, {})) })
    end
    settle(p, topic, ttl)
  end
  redis.call('DEL', p .. 'n:' .. node)
  return out
end

-- ask(P, topic, peer, message)
-- Publishes `message` (a resume asked of the session's node) to the inbox
-- of the node holding `peer`. Returns how many received it: 0 when the
-- peer is no member or its node listens no more.
local function ask(_, args)
  local p, topic, peer, message = args[1], args[2], args[3], args[4]
  local tk = keys_of(p, topic)
  local value = redis.call('HGET', tk, peer)
  if not value then
    return 0
  end
  return redis.call('PUBLISH', p .. 'node:' .. split(value), message)
end

-- move(P, topic, peer, from, to, ttl_ms, conn)
-- The session of `peer` moves from node `from` to node `to` (its
-- connection `conn` there), without a leave or a join. Publishes "M" and
-- the move, with the nodes that held members before it ("flush"), to
-- every node of the topic and to `from`; `to` also gets every member as
-- of the move (its own too: those it has that are not listed joined after
-- the move, and the moved session was not told of them by `from`).
-- Returns the version, or 0 if `from` does not hold the peer.
local function move(_, args)
  local p, topic, peer, from, to, ttl, conn = args[1], args[2], args[3], args[4], args[5],
    tonumber(args[6]), args[7]
  local tk, _, ck = keys_of(p, topic)
  local value = redis.call('HGET', tk, peer)
  if not value then
    return 0
  end
  local owner, meta = split(value)
  if owner ~= from then
    return 0
  end
  local flush = {}
  for _, node in ipairs(redis.call('HKEYS', ck)) do
    if node ~= '~v' and node ~= from then
      table.insert(flush, cjson.encode(node))
    end
  end
  remove(p, topic, peer)
  add(p, topic, peer, to, meta, now_ms() + ttl, ttl)
  local v = bump(p, topic)
  local event = 'M{"topic":' .. cjson.encode(topic) .. ',"v":' .. number(v) .. ',"moved":['
    .. cjson.encode(peer) .. ',' .. cjson.encode(from) .. ',' .. cjson.encode(to) .. ','
    .. conn .. ',' .. (meta == '' and 'null' or meta) .. '],"flush":['
    .. table.concat(flush, ',') .. ']'
  for _, node in ipairs(redis.call('HKEYS', ck)) do
    if node ~= '~v' and node ~= to and node ~= from then
      redis.call('PUBLISH', p .. 'node:' .. node, event .. '}')
    end
  end
  redis.call('PUBLISH', p .. 'node:' .. from, event .. '}')
  local members = {}
  local all = redis.call('HGETALL', tk)
  for i = 1, #all, 2 do
    local node, m = split(all[i + 1])
    table.insert(members, joined_entry(all[i], node, m))
  end
  redis.call('PUBLISH', p .. 'node:' .. to, event .. ',"members":[' .. table.concat(members, ',') .. ']}')
  settle(p, topic, ttl)
  return v
end

-- topics(P, prefix, after, limit)
-- The admin API's listing: up to `limit` topics named `prefix`..., after
-- `after` ("" for the first page), in order of name, each with its number
-- of members: a flat array topic, count, topic, count... Forgets the topics
-- whose keys expired (every node holding them died).
local function topics(_, args)
  local p, prefix, after, limit = args[1], args[2], args[3], tonumber(args[4])
  local index = p .. 'topics'
  local low = after ~= '' and '(' .. after or '[' .. prefix
  -- No UTF-8 text holds the byte 0xff: above every name with the prefix.
  local high = '[' .. prefix .. '\255'
  local out = {}
  while #out < 2 * limit do
    local names = redis.call('ZRANGEBYLEX', index, low, high, 'LIMIT', 0, limit)
    if #names == 0 then
      break
    end
    for _, name in ipairs(names) do
      local count = redis.call('HLEN', p .. 't:' .. name)
      if count == 0 then
        redis.call('ZREM', index, name)
      elseif #out < 2 * limit then
        table.insert(out, name)
        table.insert(out, count)
      end
      low = '(' .. name
    end
  end
  return out
end

redis.register_function('signaling_join', join)
redis.register_function('signaling_leave', leave)
redis.register_function('signaling_update', update)
redis.register_function('signaling_sync', sync)
redis.register_function('signaling_touch', touch)
redis.register_function('signaling_reap', reap)
redis.register_function('signaling_ask', ask)
redis.register_function('signaling_move', move)
redis.register_function('signaling_topics', topics)
