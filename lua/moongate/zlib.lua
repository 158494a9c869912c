-- moongate.zlib: streaming gzip compression and gzip/zlib decompression
-- through zlib (libz.so.1) and the LuaJIT FFI, for the compression and
-- response-transform plugins.
--
-- Not a general zlib binding: raw deflate, dictionaries and gzip header
-- fields are left out. Streams are fed piece by piece (a response body as
-- it streams) and hand back what zlib produced so far, so memory stays at
-- zlib's own window plus one output buffer whatever the body's size.
-- Every stream owns zlib state outside the Lua heap: close() frees it at
-- once (finish() does it too); a GC finalizer is only the safety net for
-- a request that was dropped half way.
--
--   local zlib = require("moongate.zlib")
--   local z = zlib.deflate({ level = 1 })
--   local a = assert(z:write(piece))        -- may be "" (zlib holds it)
--   local b = assert(z:finish())            -- the rest; the stream is closed
--   local i = zlib.inflate({ max_output = 8 * 1024 * 1024 })
--   local out, err = i:write(data)          -- err: "output too large", ...
local ffi = require("ffi")

local ffi_new, ffi_string, ffi_gc, ffi_sizeof = ffi.new, ffi.string, ffi.gc, ffi.sizeof
local concat, setmetatable, type, error, tostring = table.concat, setmetatable, type, error,
    tostring

ffi.cdef [[
typedef struct mg_z_stream_s {
    const unsigned char *next_in;
    unsigned int avail_in;
    unsigned long total_in;
    unsigned char *next_out;
    unsigned int avail_out;
    unsigned long total_out;
    const char *msg;
    void *state;
    void *zalloc;
    void *zfree;
    void *opaque;
    int data_type;
    unsigned long adler;
    unsigned long reserved;
} mg_z_stream;
const char *zlibVersion(void);
int deflateInit2_(mg_z_stream *strm, int level, int method, int windowBits, int memLevel,
                  int strategy, const char *version, int stream_size);
int deflate(mg_z_stream *strm, int flush);
int deflateEnd(mg_z_stream *strm);
int deflateReset(mg_z_stream *strm);
int inflateInit2_(mg_z_stream *strm, int windowBits, const char *version, int stream_size);
int inflate(mg_z_stream *strm, int flush);
int inflateReset(mg_z_stream *strm);
int inflateEnd(mg_z_stream *strm);
]]

local Z = ffi.load("libz.so.1")

local Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
local Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH = 0, 2, 4
local Z_DEFLATED, Z_DEFAULT_STRATEGY = 8, 0
local GZIP_WINDOW = 15 + 16     -- a gzip wrapper around a 32 KiB window
local AUTO_WINDOW = 15 + 32     -- inflate: detect gzip or zlib from the header
local MEM_LEVEL = 8             -- zlib's default: ~256 KiB per deflate stream

-- One output buffer for every stream of the worker: a call fills it, copies
-- it out into Lua strings and returns before anything else runs (streams are
-- fed from body_filter, which never yields).
local OUT_SIZE = 64 * 1024
local out_buf = ffi_new("unsigned char[?]", OUT_SIZE)
local VERSION = Z.zlibVersion()
local STREAM_SIZE = ffi_sizeof("mg_z_stream")

local _M = { DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024 }

-- Finished deflate states kept for the next response, per level: setting
-- one up (deflateInit2 allocates and clears ~256 KiB) costs more than
-- compressing a 10 KB body, deflateReset next to nothing. At most POOL_MAX
-- are kept per worker (~2 MiB), so an idle worker holds little.
local POOL_MAX = 8
local pool, pooled = {}, 0

local function z_error(strm, what, rc)
    local msg = strm.msg ~= nil and ffi_string(strm.msg) or ("zlib error " .. tostring(rc))
    return what .. ": " .. msg
end

-- Runs deflate or inflate over `data` with `flush` until zlib wants more
-- input (or finished), collecting output. Returns the output, the last rc,
-- or nil, err. `limit` (inflate only) caps the total output of the stream.
local function pump(self, fn, data, flush)
    local box = self.box
    local strm = box[0]
    strm.next_in = data
    strm.avail_in = #data
    local parts, n = nil, 0
    local first
    while true do
        strm.next_out = out_buf
        strm.avail_out = OUT_SIZE
        local in_before = strm.avail_in
        local rc = fn(box, flush)
        local produced = OUT_SIZE - strm.avail_out
        if produced > 0 then
            self.total_out = self.total_out + produced
            if self.max_output and self.total_out > self.max_output then
                self:close()
                return nil, "output too large (over " .. self.max_output .. " bytes)"
            end
            local s = ffi_string(out_buf, produced)
            if not first then
                first = s
            else
                if not parts then parts, n = { first }, 1 end
                n = n + 1
                parts[n] = s
            end
        end
        if rc == Z_STREAM_END then
            -- inflate: another gzip member may follow (RFC 1952 allows
            -- several); anything that is not one fails on the next call.
            if self.inflating and strm.avail_in > 0 then
                if Z.inflateReset(box) ~= Z_OK then
                    self:close()
                    return nil, "invalid compressed data: cannot restart after a member"
                end
            else
                self.ended = true
                break
            end
        elseif rc == Z_NEED_DICT then
            self:close()
            return nil, "invalid compressed data: needs a preset dictionary"
        elseif rc == Z_BUF_ERROR then
            -- No progress possible: all input used and output drained.
            break
        elseif rc ~= Z_OK then
            local err = z_error(strm, "invalid compressed data", rc)
            self:close()
            return nil, err
        elseif strm.avail_out > 0 and (strm.avail_in == 0 or strm.avail_in == in_before) then
            break -- took everything (or cannot progress); nothing more this round
        end
    end
    strm.next_in = nil -- do not keep a pointer into a Lua string
    if parts then return concat(parts), nil end
    return first or "", nil
end

local Stream = {}
Stream.__index = Stream

--- stream:write(data) -> output so far (possibly ""), or nil, err.
-- An error closes the stream.
function Stream:write(data)
    if type(data) ~= "string" then error("write: data must be a string", 2) end
    if self.closed then return nil, "stream closed" end
    if self.inflating and self.ended then
        if data == "" then return "" end
        self:close()
        return nil, "invalid compressed data: trailing data after the end"
    end
    return pump(self, self.fn, data, Z_NO_FLUSH)
end

--- stream:flush() -> everything compressed so far (deflate only: a sync
-- flush, so a client can decode all of it now), or nil, err.
function Stream:flush()
    if self.closed then return nil, "stream closed" end
    if self.inflating then return "" end
    return pump(self, self.fn, "", Z_SYNC_FLUSH)
end

--- stream:finish([data]) -> the last output, or nil, err. Ends and closes
-- the stream. For inflate it is an error when the compressed data did not
-- end ("truncated compressed data").
function Stream:finish(data)
    if self.closed then return nil, "stream closed" end
    local out, err
    if self.inflating then
        out, err = self:write(data or "")
        if out and not self.ended then
            out, err = nil, "truncated compressed data"
        end
    else
        out, err = pump(self, self.fn, data or "", Z_FINISH)
        if out and not self.ended then
            out, err = nil, "deflate did not finish"
        end
    end
    self:close()
    return out, err
end

--- stream:close(): frees zlib's state now (a deflate state that finished
-- cleanly goes back to the pool instead). Idempotent.
function Stream:close()
    if self.closed then return end
    self.closed = true
    local box = self.box
    self.box = nil
    if not self.inflating and self.ended and pooled < POOL_MAX
        and Z.deflateReset(box) == Z_OK then
        local free = pool[self.level]
        if not free then
            free = {}
            pool[self.level] = free
        end
        free[#free + 1] = box
        pooled = pooled + 1
        return
    end
    ffi_gc(box, nil)
    if self.inflating then Z.inflateEnd(box) else Z.deflateEnd(box) end
end

local function end_deflate(strm) Z.deflateEnd(strm) end
local function end_inflate(strm) Z.inflateEnd(strm) end

--- zlib.deflate({ level = 1..9 (default 6) }) -> a gzip compressing stream,
-- or nil, err.
function _M.deflate(opts)
    local level = opts and opts.level or 6
    if type(level) ~= "number" or level < 1 or level > 9 or level % 1 ~= 0 then
        error("deflate: level must be an integer from 1 to 9", 2)
    end
    local free = pool[level]
    local n = free and #free or 0
    if n > 0 then
        local strm = free[n] -- reset when it was pooled
        free[n] = nil
        pooled = pooled - 1
        return setmetatable({ box = strm, fn = Z.deflate, total_out = 0, level = level }, Stream)
    end
    local strm = ffi_new("mg_z_stream[1]")
    local rc = Z.deflateInit2_(strm, level, Z_DEFLATED, GZIP_WINDOW, MEM_LEVEL,
        Z_DEFAULT_STRATEGY, VERSION, STREAM_SIZE)
    if rc ~= Z_OK then return nil, "deflateInit2 failed: " .. rc end
    ffi_gc(strm, end_deflate)
    return setmetatable({ box = strm, fn = Z.deflate, total_out = 0, level = level }, Stream)
end

--- zlib.inflate({ max_output = bytes }) -> a decompressing stream for gzip
-- or zlib data (told apart by the header), or nil, err. Its total output
-- past max_output (default DEFAULT_MAX_OUTPUT) is an error: a small
-- compressed body can expand a thousandfold (a decompression bomb).
function _M.inflate(opts)
    local max = opts and opts.max_output or _M.DEFAULT_MAX_OUTPUT
    local strm = ffi_new("mg_z_stream[1]")
    local rc = Z.inflateInit2_(strm, AUTO_WINDOW, VERSION, STREAM_SIZE)
    if rc ~= Z_OK then return nil, "inflateInit2 failed: " .. rc end
    ffi_gc(strm, end_inflate)
    return setmetatable({ box = strm, fn = Z.inflate, total_out = 0, inflating = true,
        max_output = max }, Stream)
end

--- zlib.gzip(data[, level]) -> gzip bytes, or nil, err.
function _M.gzip(data, level)
    local z, err = _M.deflate({ level = level })
    if not z then return nil, err end
    return z:finish(data)
end

--- zlib.gunzip(data[, max_output]) -> the decompressed bytes, or nil, err.
function _M.gunzip(data, max_output)
    local z, err = _M.inflate({ max_output = max_output })
    if not z then return nil, err end
    return z:finish(data)
end

return _M
