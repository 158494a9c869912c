-- moongate.brotli: streaming brotli encoding and decoding through libbrotli
-- (libbrotlienc.so.1, libbrotlidec.so.1) and the LuaJIT FFI, for the
-- compression and response-transform plugins.
--
-- Same shape as moongate.zlib: streams are fed piece by piece and hand back
-- what the library produced so far; close() frees the library's state at
-- once (finish() does it too), a GC finalizer is only the safety net.
--
--   local brotli = require("moongate.brotli")
--   local e = brotli.encoder({ quality = 4 })
--   local a = assert(e:write(piece))        -- may be ""
--   local b = assert(e:finish())            -- the rest; the stream is closed
--   local d = brotli.decoder({ max_output = 8 * 1024 * 1024 })
--   local out, err = d:write(data)          -- err: "output too large", ...
local ffi = require("ffi")

local ffi_new, ffi_string, ffi_gc, ffi_cast = ffi.new, ffi.string, ffi.gc, ffi.cast
local concat, setmetatable, type, error, tonumber = table.concat, setmetatable, type, error,
    tonumber

ffi.cdef [[
typedef struct BrotliEncoderStateStruct BrotliEncoderState;
typedef struct BrotliDecoderStateStruct BrotliDecoderState;
BrotliEncoderState *BrotliEncoderCreateInstance(void *alloc_func, void *free_func, void *opaque);
int BrotliEncoderSetParameter(BrotliEncoderState *state, int param, uint32_t value);
int BrotliEncoderCompressStream(BrotliEncoderState *state, int op, size_t *available_in,
                                const uint8_t **next_in, size_t *available_out,
                                uint8_t **next_out, size_t *total_out);
int BrotliEncoderIsFinished(BrotliEncoderState *state);
int BrotliEncoderHasMoreOutput(BrotliEncoderState *state);
void BrotliEncoderDestroyInstance(BrotliEncoderState *state);
BrotliDecoderState *BrotliDecoderCreateInstance(void *alloc_func, void *free_func, void *opaque);
int BrotliDecoderDecompressStream(BrotliDecoderState *state, size_t *available_in,
                                  const uint8_t **next_in, size_t *available_out,
                                  uint8_t **next_out, size_t *total_out);
int BrotliDecoderGetErrorCode(const BrotliDecoderState *state);
const char *BrotliDecoderErrorString(int code);
void BrotliDecoderDestroyInstance(BrotliDecoderState *state);
]]

local E = ffi.load("libbrotlienc.so.1")
local D = ffi.load("libbrotlidec.so.1")

local OP_PROCESS, OP_FLUSH, OP_FINISH = 0, 1, 2
local PARAM_MODE, PARAM_QUALITY, PARAM_LGWIN = 0, 1, 2
local MODE_TEXT = 1
local DEC_ERROR, DEC_SUCCESS, DEC_NEEDS_MORE_INPUT, DEC_NEEDS_MORE_OUTPUT = 0, 1, 2, 3
-- A 256 KiB window (brotli's default is 4 MiB): every response being
-- compressed holds one, so the window bounds the memory per response; for
-- API bodies the ratio lost is small.
local DEFAULT_LGWIN = 18

-- One output buffer and in/out cursors for every stream of the worker (see
-- moongate.zlib: calls never yield half way).
local OUT_SIZE = 64 * 1024
local out_buf = ffi_new("uint8_t[?]", OUT_SIZE)
local avail_in = ffi_new("size_t[1]")
local next_in = ffi_new("const uint8_t *[1]")
local avail_out = ffi_new("size_t[1]")
local next_out = ffi_new("uint8_t *[1]")

local _M = { DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024 }

local Stream = {}
Stream.__index = Stream

local function collect(self, parts, n, first)
    local produced = OUT_SIZE - tonumber(avail_out[0])
    if produced == 0 then return parts, n, first end
    self.total_out = self.total_out + produced
    local s = ffi_string(out_buf, produced)
    if not first then return parts, n, s end
    if not parts then parts, n = { first }, 1 end
    n = n + 1
    parts[n] = s
    return parts, n, first
end

local function result(parts, first)
    if parts then return concat(parts) end
    return first or ""
end

-- Encoder: runs `op` over data until the encoder took all input and has no
-- output pending (and, for FINISH, is finished).
local function encode(self, data, op)
    local st = self.state
    avail_in[0] = #data
    next_in[0] = ffi_cast("const uint8_t *", data)
    local parts, n, first
    while true do
        avail_out[0] = OUT_SIZE
        next_out[0] = out_buf
        if E.BrotliEncoderCompressStream(st, op, avail_in, next_in, avail_out, next_out, nil)
            == 0 then
            self:close()
            return nil, "brotli encoder failed"
        end
        parts, n, first = collect(self, parts, n, first)
        if avail_in[0] == 0 and E.BrotliEncoderHasMoreOutput(st) == 0
            and (op ~= OP_FINISH or E.BrotliEncoderIsFinished(st) ~= 0) then
            break
        end
    end
    next_in[0] = nil
    if op == OP_FINISH then self.ended = true end
    return result(parts, first)
end

-- Decoder: feeds data until it needs more input or the stream ended.
local function decode(self, data)
    local st = self.state
    avail_in[0] = #data
    next_in[0] = ffi_cast("const uint8_t *", data)
    local parts, n, first
    while true do
        avail_out[0] = OUT_SIZE
        next_out[0] = out_buf
        local rc = D.BrotliDecoderDecompressStream(st, avail_in, next_in, avail_out, next_out, nil)
        parts, n, first = collect(self, parts, n, first)
        if self.total_out > self.max_output then
            self:close()
            return nil, "output too large (over " .. self.max_output .. " bytes)"
        end
        if rc == DEC_SUCCESS then
            self.ended = true
            if avail_in[0] > 0 then
                self:close()
                return nil, "invalid compressed data: trailing data after the end"
            end
            break
        elseif rc == DEC_NEEDS_MORE_INPUT then
            break
        elseif rc ~= DEC_NEEDS_MORE_OUTPUT then
            local code = D.BrotliDecoderGetErrorCode(st)
            local msg = ffi_string(D.BrotliDecoderErrorString(code))
            self:close()
            return nil, "invalid compressed data: " .. msg
        end
    end
    next_in[0] = nil
    return result(parts, first)
end

--- stream:write(data) -> output so far (possibly ""), or nil, err. An
-- error closes the stream.
function Stream:write(data)
    if type(data) ~= "string" then error("write: data must be a string", 2) end
    if self.closed then return nil, "stream closed" end
    if self.decoding then
        if self.ended then
            if data == "" then return "" end
            self:close()
            return nil, "invalid compressed data: trailing data after the end"
        end
        if data == "" then return "" end
        return decode(self, data)
    end
    return encode(self, data, OP_PROCESS)
end

--- stream:flush() -> everything encoded so far, decodable now (encoder
-- only), or nil, err.
function Stream:flush()
    if self.closed then return nil, "stream closed" end
    if self.decoding then return "" end
    return encode(self, "", OP_FLUSH)
end

--- stream:finish([data]) -> the last output, or nil, err. Ends and closes
-- the stream; for a decoder it is an error when the data did not end
-- ("truncated compressed data").
function Stream:finish(data)
    if self.closed then return nil, "stream closed" end
    local out, err
    if self.decoding then
        out, err = self:write(data or "")
        if out and not self.ended then out, err = nil, "truncated compressed data" end
    else
        out, err = encode(self, data or "", OP_FINISH)
    end
    self:close()
    return out, err
end

--- stream:close(): frees the library's state now. Idempotent.
function Stream:close()
    if self.closed then return end
    self.closed = true
    local st = self.state
    ffi_gc(st, nil)
    if self.decoding then
        D.BrotliDecoderDestroyInstance(st)
    else
        E.BrotliEncoderDestroyInstance(st)
    end
end

--- brotli.encoder({ quality = 0..11 (default 4), lgwin = 10..24 (default
-- 18) }) -> an encoding stream, or nil, err.
function _M.encoder(opts)
    local q = opts and opts.quality or 4
    local lgwin = opts and opts.lgwin or DEFAULT_LGWIN
    if type(q) ~= "number" or q < 0 or q > 11 or q % 1 ~= 0 then
        error("encoder: quality must be an integer from 0 to 11", 2)
    end
    if type(lgwin) ~= "number" or lgwin < 10 or lgwin > 24 or lgwin % 1 ~= 0 then
        error("encoder: lgwin must be an integer from 10 to 24", 2)
    end
    local st = E.BrotliEncoderCreateInstance(nil, nil, nil)
    if st == nil then return nil, "cannot create a brotli encoder" end
    st = ffi_gc(st, E.BrotliEncoderDestroyInstance)
    E.BrotliEncoderSetParameter(st, PARAM_QUALITY, q)
    E.BrotliEncoderSetParameter(st, PARAM_LGWIN, lgwin)
    if opts and opts.text then E.BrotliEncoderSetParameter(st, PARAM_MODE, MODE_TEXT) end
    return setmetatable({ state = st, total_out = 0 }, Stream)
end

--- brotli.decoder({ max_output = bytes }) -> a decoding stream, or nil,
-- err. Its total output past max_output (default DEFAULT_MAX_OUTPUT) is an
-- error (a decompression bomb).
function _M.decoder(opts)
    local st = D.BrotliDecoderCreateInstance(nil, nil, nil)
    if st == nil then return nil, "cannot create a brotli decoder" end
    st = ffi_gc(st, D.BrotliDecoderDestroyInstance)
    return setmetatable({ state = st, total_out = 0, decoding = true,
        max_output = opts and opts.max_output or _M.DEFAULT_MAX_OUTPUT }, Stream)
end

--- brotli.compress(data[, quality]) -> brotli bytes, or nil, err.
function _M.compress(data, quality)
    local e, err = _M.encoder({ quality = quality })
    if not e then return nil, err end
    return e:finish(data)
end

--- brotli.decompress(data[, max_output]) -> the decoded bytes, or nil, err.
function _M.decompress(data, max_output)
    local d, err = _M.decoder({ max_output = max_output })
    if not d then return nil, err end
    return d:finish(data)
end

return _M
