-- plugins/jwt-auth.lua under random and mutated tokens (issue 11: JWT
-- parsing). Token parsing is Lua over C through the FFI (base64url,
-- lua-cjson, OpenSSL HMAC and signature checks), so this is a property
-- spec rather than a libFuzzer harness: a fixed-seed generator throws
-- thousands of tokens at P.verify under HMAC, RSA, EC, Ed25519 and JWKS
-- configs and checks, for every one:
--   * P.verify never raises (the request would become a 500) and returns
--     either claims or one of the plugin's 401 reasons (listed below);
--   * no forgery: a token accepted under a key whose seed tokens are the
--     only signed ones has exactly a seed token's signed part
--     (header.payload bytes) and signature bytes;
--   * P.consumer_of never raises on accepted claims.
-- Seeds are fixed, so a failure names a reproducible token.
local gw = require("moongate.gw")
local schema = require("moongate.schema")

local crypto, json = gw.crypto, gw.json
local P = dofile("plugins/jwt-auth.lua")

local DIR = "spec/fixtures/jwt/"
local function read(name)
    local f = assert(io.open(DIR .. name, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end
local V = assert(json.decode(read("vectors.json")))
local RFC, T = V.rfc, V.tokens
local NOW = 1800000000
local ROUNDS = 2500 -- mutated tokens per config (and as many generated)

local function conf(c)
    local out, errs = schema.validate(P.schema, c)
    assert(out, errs and table.concat(errs, "; "))
    return out
end

local b64 = crypto.base64url_encode

-- The reasons P.verify may give (everything it returns but claims).
local REASONS = {}
for _, r in ipairs({ "missing token", "token too large", "malformed token",
    "malformed token header", "missing alg", "alg none refused", "missing kid",
    "unknown kid", "algorithm not allowed for this key", "malformed signature",
    "signature mismatch", "malformed token payload", "exp is not a number",
    "token expired", "missing exp claim", "nbf is not a number", "token not yet valid",
    "iat is not a number", "token issued in the future", "issuer not accepted",
    "audience not accepted" }) do
    REASONS[r] = true
end
local function known_reason(err)
    return type(err) == "string" and (REASONS[err] or err:match("^missing .+ claim$") ~= nil)
end

-- Park-Miller: exact in doubles, the same on every platform.
local function prng(seed)
    local s = seed
    return function(n) -- 1..n
        s = s * 16807 % 2147483647
        return s % n + 1
    end
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local ODD = { ".", "=", "+", "/", " ", "\0", "\255", "%", "..", "\r\n", "é" }

local function rand_bytes(r, n)
    local t = {}
    for i = 1, n do t[i] = string.char(r(256) - 1) end
    return table.concat(t)
end

local function rand_b64(r, n)
    local t = {}
    for i = 1, n do
        local k = r(64)
        t[i] = B64:sub(k, k)
    end
    return table.concat(t)
end

-- A JSON value of some odd shape, for header and claim members.
local function odd_value(r, depth)
    local k = r(12)
    if k == 1 then return json.null end
    if k == 2 then return r(2) == 1 end
    if k == 3 then return ({ 0, -1, 1e308, -1e308, 2 ^ 53 + 1, 0.5, 4102444800, NOW })[r(8)] end
    if k == 4 then return rand_bytes(r, r(20) - 1) end
    if k == 5 then return ({ "HS256", "RS256", "ES256", "EdDSA", "none", "NONE", "PS256", "hs256" })[r(8)] end
    if k == 6 and depth < 4 then return { odd_value(r, depth + 1), odd_value(r, depth + 1) } end
    if k == 7 and depth < 4 then return { alg = odd_value(r, depth + 1), kid = odd_value(r, depth + 1) } end
    if k == 8 then return ({ "rsa-1", "ec-1", "ed-1", "", "hs-1" })[r(5)] end
    if k == 9 then return {} end
    return rand_b64(r, r(30))
end

-- Raw JSON text that cjson may or may not accept.
local function odd_json(r)
    local k = r(8)
    if k == 1 then return string.rep("[", r(3000)) end -- nesting past cjson's limit
    if k == 2 then return '{"alg":"HS256","alg":"RS256"}' end
    if k == 3 then return '{"alg":"HS256"' end
    if k == 4 then return '{"exp":1e999,"alg":"HS256"}' end
    if k == 5 then return '{"alg":"HS256"}\0{"alg":"none"}' end
    if k == 6 then return rand_bytes(r, r(64)) end
    if k == 7 then return '"just a string"' end
    local t = {}
    for _, name in ipairs({ "alg", "kid", "typ", "crit", "b64", "exp", "nbf", "iat", "sub", "aud" }) do
        if r(2) == 1 then t[name] = odd_value(r, 0) end
    end
    return json.encode(t) or "{}"
end

local function split(tok)
    local out = {}
    for part in (tok .. "."):gmatch("([^.]*)%.") do out[#out + 1] = part end
    return out
end

local function mutate(r, tok)
    local op = r(10)
    local n = #tok
    local i = r(n + 1) - 1
    if op == 1 then -- replace one character
        local k = r(64)
        return tok:sub(1, i) .. B64:sub(k, k) .. tok:sub(i + 2)
    elseif op == 2 then -- insert something odd
        return tok:sub(1, i) .. ODD[r(#ODD)] .. tok:sub(i + 1)
    elseif op == 3 then -- delete a run
        return tok:sub(1, i) .. tok:sub(i + 1 + r(8))
    elseif op == 4 then -- truncate
        return tok:sub(1, i)
    elseif op == 5 then -- a segment replaced by encoded odd JSON
        local p = split(tok)
        p[r(math.min(#p, 2))] = b64(odd_json(r))
        return table.concat(p, ".")
    elseif op == 6 then -- signature replaced by random bytes
        local p = split(tok)
        p[#p] = b64(rand_bytes(r, r(600) - 1))
        return table.concat(p, ".")
    elseif op == 7 then -- segments shuffled, duplicated or dropped
        local p = split(tok)
        local a, b = r(#p), r(#p)
        p[a], p[b] = p[b], p[a]
        if r(2) == 1 then table.insert(p, r(#p + 1), p[r(#p)]) end
        if r(3) == 1 and #p > 1 then table.remove(p, r(#p)) end
        return table.concat(p, ".")
    elseif op == 8 then -- header with an odd alg/kid, original payload and signature
        local p = split(tok)
        p[1] = b64(json.encode({ alg = odd_value(r, 0), kid = odd_value(r, 0) }) or "{}")
        return table.concat(p, ".")
    elseif op == 9 then -- flip the low bits of the last char of a segment
        local p = split(tok)
        local s = r(#p)
        local seg = p[s]
        if #seg > 0 then
            local c = seg:byte(#seg)
            p[s] = seg:sub(1, -2) .. string.char(bit.bxor(c, r(3)))
        end
        return table.concat(p, ".")
    else -- several at once
        for _ = 1, r(4) do tok = mutate(r, tok) end
        return tok
    end
end

local function generated(r)
    local parts = {}
    for i = 1, r(5) do
        parts[i] = r(3) == 1 and rand_b64(r, r(200)) or b64(odd_json(r))
    end
    return table.concat(parts, ".")
end

local SECRET = "a-long-enough-shared-secret-for-tests"
local CLAIMS = { sub = "alice", roles = { "user" }, exp = NOW + 60 }
local function hs(alg, header, payload)
    local h, p = b64(json.encode(header)), b64(json.encode(payload))
    local mac = crypto.hmac(({ HS256 = "sha256", HS384 = "sha384", HS512 = "sha512" })[alg],
        SECRET, h .. "." .. p)
    return h .. "." .. p .. "." .. b64(mac)
end

-- name, config, the tokens signed for it (the only ones that may pass).
local CASES = {
    { "HMAC", conf({ key = { secret = SECRET, algorithms = { "HS256", "HS384", "HS512" } },
        required_claims = { "sub" } }),
        { hs("HS256", { alg = "HS256" }, CLAIMS), hs("HS512", { alg = "HS512", typ = "JWT" }, CLAIMS) } },
    { "RS256", conf({ key = { public_key = read("rsa.pub.pem"), algorithms = { "RS256", "PS256" } } }),
        { T.RS256, T.PS256 } },
    { "ES256", conf({ key = { public_key = read("ec256.pub.pem"), algorithms = { "ES256" } } }),
        { T.ES256 } },
    { "EdDSA", conf({ key = { public_key = read("ed25519.pub.pem"), algorithms = { "EdDSA" } } }),
        { T.EdDSA } },
    { "JWKS", conf({ jwks = V.jwks, jwks_algorithms = { "RS256", "ES256", "EdDSA" },
        audiences = { "moongate" }, issuers = { "https://issuer.test" } }),
        { T.kid_rsa, T.kid_ec, T.kid_ed } },
}

local function signed_part_and_sig(tok)
    local p = split(tok)
    if #p ~= 3 then return nil end
    return p[1] .. "." .. p[2], crypto.base64url_decode(p[3])
end

describe("jwt-auth under random and mutated tokens", function()
    for ci, case in ipairs(CASES) do
        local name, c, seeds = case[1], case[2], case[3]
        it(name .. ": never raises, refuses with a known reason, accepts only what was signed", function()
            local r = prng(1000 + ci)
            local allowed = {}
            for _, s in ipairs(seeds) do
                local claims, err = P.verify(c, s, NOW)
                assert(claims, name .. " seed refused: " .. tostring(err))
                local part, sig = signed_part_and_sig(s)
                allowed[part] = sig
            end
            local accepted, reasons = 0, {}
            for i = 1, 2 * ROUNDS do
                local tok = i <= ROUNDS and mutate(r, seeds[r(#seeds)]) or generated(r)
                local ok, claims, err = pcall(P.verify, c, tok, NOW)
                if not ok then
                    error(("P.verify raised %s on token %q"):format(tostring(claims), tok))
                end
                if claims then
                    local part, sig = signed_part_and_sig(tok)
                    if not (part and allowed[part] and allowed[part] == sig) then
                        error(("accepted a token that was never signed: %q"):format(tok))
                    end
                    local cok, cerr = pcall(P.consumer_of, c, claims)
                    assert(cok, "consumer_of raised: " .. tostring(cerr))
                    accepted = accepted + 1
                else
                    if not known_reason(err) then
                        error(("unknown reason %q for token %q"):format(tostring(err), tok))
                    end
                    reasons[err] = (reasons[err] or 0) + 1
                end
            end
            -- The generator reaches deep: more than the shallow refusals.
            assert.is_true((reasons["signature mismatch"] or 0) > 0, name)
            assert.is_true((reasons["malformed token header"] or 0) > 0, name)
            assert.is_true((reasons["malformed token"] or 0) > 0, name)
        end)
    end
end)
