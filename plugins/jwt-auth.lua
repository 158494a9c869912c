-- jwt-auth: verifies a JWS compact token (JWT) and tells the upstream who is
-- calling. The token comes from a header (default `Authorization: Bearer`),
-- a cookie or a query parameter; the key is chosen by configuration (a
-- single key, or one per `kid`), and each key carries its own allowlist of
-- algorithms: the token's `alg` header only has to be on that list, it never
-- selects how to verify (SECURITY.md point 8). `jku`, `x5u`, `x5c` and `jwk`
-- headers are ignored; `kid` is only a table lookup.
--
-- On success: ctx.consumer = { id, roles, claims } and the upstream gets
-- X-User-ID / X-User-Roles (the core already removed the client's copies).
-- On failure: 401, a JSON body and a `WWW-Authenticate: Bearer` challenge.
--
-- Keys: a single key, keys by kid, or an inline JWK Set (converted to PEM
-- once per generation). Not here (yet): JWKS from a file or a URL, a
-- verified-token cache.
local gw = require("moongate.gw")

local type, pairs, ipairs, next, tostring, setmetatable = type, pairs, ipairs, next, tostring, setmetatable
local find, sub, lower, gsub, gmatch = string.find, string.sub, string.lower, string.gsub, string.gmatch
local concat = table.concat
local crypto, json = gw.crypto, gw.json

local HMAC_ALGS = { HS256 = "sha256", HS384 = "sha384", HS512 = "sha512" }
-- Public-key algorithms by key type (and, for EC, by curve size in bits).
local PK_ALGS = {
    RS256 = "RSA", RS384 = "RSA", RS512 = "RSA",
    PS256 = "RSA", PS384 = "RSA", PS512 = "RSA",
    ES256 = "EC", ES384 = "EC",
    EdDSA = "Ed25519",
}
local EC_BITS = { ES256 = 256, ES384 = 384 }
local CURVE_OF = { ES256 = "P-256", ES384 = "P-384" }

local KEY_FIELDS = {
    secret = { type = "string", min_len = 1,
        description = "HMAC shared secret (HS256/384/512 only)" },
    secret_is_base64url = { type = "boolean", default = false,
        description = "the secret is base64url-encoded (as a JWK `k`); decoded once at load" },
    public_key = { type = "string",
        description = "PEM public key (SubjectPublicKeyInfo) for RS*, PS*, ES256/384 or EdDSA" },
    algorithms = { type = "array", required = true, items = { type = "string" },
        description = "algorithms this key may verify; the token's alg must be one of them" },
}

local P = {
    name = "jwt-auth",
    priority = 1100,
    schema = {
        fields = {
            header = { type = "string", default = "Authorization",
                description = "request header holding the token ('Bearer <token>' or the bare token); \"\" to not look in headers" },
            cookie = { type = "string",
                description = "cookie holding the token, looked at when the header has none" },
            query = { type = "string",
                description = "query parameter holding the token, looked at last" },
            key = { type = "table", fields = KEY_FIELDS,
                description = "the single key, used whatever the token's kid says" },
            keys = { type = "map", values = { type = "table", fields = KEY_FIELDS,
                    description = "a key" },
                description = "keys by kid; a token's kid must name one of them" },
            jwks = { type = "table", description = "an inline JWK Set: { keys = { JWK, ... } } (RSA, EC P-256/P-384, OKP Ed25519 public keys; each with a kid)",
                fields = { keys = { type = "array", required = true,
                    items = { type = "table", description = "a JWK" },
                    description = "the JWKs" } } },
            jwks_algorithms = { type = "array", items = { type = "string" },
                description = "algorithms for JWKs without an alg member (a JWK's own alg must also be listed here when given)" },
            exp_required = { type = "boolean", default = true,
                description = "refuse tokens without an exp claim" },
            leeway = { type = "number", default = 0, min = 0, max = 600,
                description = "seconds of clock skew allowed for exp, nbf and iat" },
            issuers = { type = "array", items = { type = "string" },
                description = "when given, the iss claim must be one of these" },
            audiences = { type = "array", items = { type = "string" },
                description = "when given, the aud claim (string or list) must contain one of these" },
            required_claims = { type = "array", items = { type = "string" }, default = {},
                description = "claims that must be present" },
            consumer_claim = { type = "string", default = "sub",
                description = "claim naming the consumer (ctx.consumer.id, X-User-ID)" },
            roles_claim = { type = "string", default = "roles",
                description = "claim holding the roles: a list, or a space-separated string" },
            id_header = { type = "string", default = "X-User-ID",
                description = "upstream header for the consumer id; \"\" for none" },
            roles_header = { type = "string", default = "X-User-Roles",
                description = "upstream header for the roles, comma-joined; \"\" for none" },
            max_token_size = { type = "integer", default = 8192, min = 64,
                description = "longer tokens are refused before any decoding" },
            verified_cache = { type = "integer", default = 1024, min = 0,
                description = "tokens whose signature verified, remembered per worker so a "
                    .. "token seen again skips decoding and signature checks (its claims, exp "
                    .. "included, are still checked every time); 0 turns it off" },
        },
    },
}

local function in_list(v, list)
    for _, x in ipairs(list) do
        if x == v then return true end
    end
    return false
end

-- Checks one key's config: exactly one of secret/public_key, algorithms
-- that fit it. Returns the compiled key or nil, why.
local function compile_key(k)
    if (k.secret == nil) == (k.public_key == nil) then
        return nil, "needs exactly one of secret and public_key"
    end
    if #k.algorithms == 0 then return nil, "algorithms must not be empty" end
    local out = { algs = {} }
    if k.secret then
        local secret = k.secret
        if k.secret_is_base64url then
            secret = crypto.base64url_decode(secret)
            if not secret or secret == "" then return nil, "secret is not base64url" end
        end
        out.secret = secret
        for _, alg in ipairs(k.algorithms) do
            if not HMAC_ALGS[alg] then
                return nil, "algorithm " .. alg .. " cannot be used with a secret (HS256, HS384, HS512)"
            end
            out.algs[alg] = true
        end
        return out
    end
    local pkey, err = crypto.load_public_key(k.public_key)
    if not pkey then return nil, "public_key: " .. err end
    out.pkey = pkey
    for _, alg in ipairs(k.algorithms) do
        local want = PK_ALGS[alg]
        if not want then
            return nil, "algorithm " .. alg .. " cannot be used with a public key"
        end
        if want ~= pkey.type then
            return nil, "algorithm " .. alg .. " does not fit a " .. pkey.type .. " key"
        end
        if EC_BITS[alg] and EC_BITS[alg] ~= pkey.bits then
            return nil, "algorithm " .. alg .. " does not fit a " .. pkey.bits .. "-bit EC key"
        end
        if want == "RSA" and pkey.bits < 2048 then
            return nil, "RSA keys under 2048 bits are refused"
        end
        out.algs[alg] = true
    end
    return out
end

-- DER pieces for SubjectPublicKeyInfo, so JWKs can go through the same
-- PEM loader as configured keys (one parser, one set of checks).
local function der_len(n)
    if n < 128 then return string.char(n) end
    if n < 256 then return "\129" .. string.char(n) end
    return "\130" .. string.char(math.floor(n / 256), n % 256)
end
local function der(tag, body) return tag .. der_len(#body) .. body end
local function der_int(bytes)
    bytes = bytes:gsub("^%z+", "")
    if bytes == "" or bytes:byte(1) >= 128 then bytes = "\0" .. bytes end
    return der("\2", bytes)
end
local OID_RSA = "\6\9\42\134\72\134\247\13\1\1\1"
local OID_EC = "\6\7\42\134\72\206\61\2\1"
local CURVES = { ["P-256"] = { "\6\8\42\134\72\206\61\3\1\7", 32 },
    ["P-384"] = { "\6\5\43\129\4\0\34", 48 } }
local OID_ED25519 = "\6\3\43\101\112"

local function b64field(jwk, name, size)
    local v = type(jwk[name]) == "string" and crypto.base64url_decode(jwk[name])
    if not v or v == "" or (size and #v ~= size) then return nil end
    return v
end

--- P.jwk_to_pem(jwk) -> PEM text, or nil, why. Public members only.
function P.jwk_to_pem(jwk)
    local spki
    if jwk.kty == "RSA" then
        local n, e = b64field(jwk, "n"), b64field(jwk, "e")
        if not n or not e then return nil, "RSA JWK needs n and e" end
        spki = der("\48", der("\48", OID_RSA .. "\5\0")
            .. der("\3", "\0" .. der("\48", der_int(n) .. der_int(e))))
    elseif jwk.kty == "EC" then
        local curve = CURVES[jwk.crv]
        if not curve then return nil, "unsupported EC curve" end
        local x, y = b64field(jwk, "x", curve[2]), b64field(jwk, "y", curve[2])
        if not x or not y then return nil, "EC JWK needs x and y of the curve's size" end
        spki = der("\48", der("\48", OID_EC .. curve[1]) .. der("\3", "\0\4" .. x .. y))
    elseif jwk.kty == "OKP" and jwk.crv == "Ed25519" then
        local x = b64field(jwk, "x", 32)
        if not x then return nil, "Ed25519 JWK needs x" end
        spki = der("\48", der("\48", OID_ED25519) .. der("\3", "\0" .. x))
    else
        return nil, "unsupported JWK kty (RSA, EC, OKP Ed25519)"
    end
    local b64, lines = crypto.base64_encode(spki), {}
    for i = 1, #b64, 64 do lines[#lines + 1] = b64:sub(i, i + 63) end
    return "-----BEGIN PUBLIC KEY-----\n" .. concat(lines, "\n") .. "\n-----END PUBLIC KEY-----\n"
end

-- JWKs -> key specs by kid, with their algorithm allowlists.
local function jwks_specs(conf)
    local out = {}
    for i, jwk in ipairs(conf.jwks.keys) do
        local where = "jwks.keys[" .. i .. "]: "
        if type(jwk.kid) ~= "string" or jwk.kid == "" then return nil, where .. "needs a kid" end
        if out[jwk.kid] then return nil, where .. "duplicate kid " .. jwk.kid end
        if jwk.d ~= nil or jwk.p ~= nil or jwk.k ~= nil then
            return nil, where .. "private or symmetric key material does not belong in jwks"
        end
        local pem, err = P.jwk_to_pem(jwk)
        if not pem then return nil, where .. err end
        local algs
        if jwk.alg ~= nil then
            if type(jwk.alg) ~= "string" then return nil, where .. "alg must be a string" end
            if conf.jwks_algorithms and not in_list(jwk.alg, conf.jwks_algorithms) then
                return nil, where .. "alg " .. jwk.alg .. " is not in jwks_algorithms"
            end
            algs = { jwk.alg }
        elseif conf.jwks_algorithms then
            -- those of the list that fit this JWK's type and curve
            algs = {}
            local kind = jwk.kty == "OKP" and "Ed25519" or jwk.kty
            for _, alg in ipairs(conf.jwks_algorithms) do
                if PK_ALGS[alg] == kind and (not EC_BITS[alg] or CURVE_OF[alg] == jwk.crv) then
                    algs[#algs + 1] = alg
                end
            end
            if #algs == 0 then return nil, where .. "no algorithm in jwks_algorithms fits this key" end
        else
            return nil, where .. "has no alg and jwks_algorithms is not set"
        end
        out[jwk.kid] = { public_key = pem, algorithms = algs }
    end
    return out
end

-- Compiles a whole conf: { single = key } or { by_kid = { kid = key } }.
local function compile(conf)
    local n_sources = (conf.key and 1 or 0) + (conf.keys and 1 or 0) + (conf.jwks and 1 or 0)
    if n_sources ~= 1 then
        return nil, "needs exactly one of key, keys and jwks"
    end
    if conf.jwks then
        local specs, err = jwks_specs(conf)
        if not specs then return nil, err end
        local by_kid = {}
        for kid, spec in pairs(specs) do
            local k, kerr = compile_key(spec)
            if not k then return nil, "jwks kid " .. kid .. ": " .. kerr end
            by_kid[kid] = k
        end
        if next(by_kid) == nil then return nil, "jwks.keys must not be empty" end
        return { by_kid = by_kid }
    end
    if conf.key then
        local k, err = compile_key(conf.key)
        if not k then return nil, "key: " .. err end
        return { single = k }
    end
    local by_kid, n = {}, 0
    for kid, spec in pairs(conf.keys) do
        local k, err = compile_key(spec)
        if not k then return nil, "keys." .. kid .. ": " .. err end
        by_kid[kid] = k
        n = n + 1
    end
    if n == 0 then return nil, "keys must not be empty" end
    return { by_kid = by_kid }
end

function P.schema.check(conf)
    local ok, err = compile(conf)
    if not ok then return nil, err end
    if conf.header == "" and not conf.cookie and not conf.query then
        return nil, "no place to look for the token (header, cookie or query)"
    end
    return true
end

-- Compiled keys per conf table: built on first use in each generation (a
-- conf is one route's config of one generation) and dropped with it.
local compiled = setmetatable({}, { __mode = "k" })

local function keys_of(conf)
    local c = compiled[conf]
    if not c then
        local err
        c, err = compile(conf)
        if not c then error("jwt-auth: " .. err) end -- schema.check refused this already
        compiled[conf] = c
    end
    return c
end

local function decode_json_object(part)
    local raw = crypto.base64url_decode(part)
    if not raw then return nil end
    local v = json.decode(raw)
    if type(v) ~= "table" or v[1] ~= nil then return nil end
    return v
end

local function is_number(v) return type(v) == "number" and v == v end

local function check_claims(conf, claims, now)
    local leeway = conf.leeway
    local exp = claims.exp
    if exp ~= nil then
        if not is_number(exp) then return nil, "exp is not a number" end
        if now > exp + leeway then return nil, "token expired" end
    elseif conf.exp_required then
        return nil, "missing exp claim"
    end
    local nbf = claims.nbf
    if nbf ~= nil then
        if not is_number(nbf) then return nil, "nbf is not a number" end
        if now + leeway < nbf then return nil, "token not yet valid" end
    end
    local iat = claims.iat
    if iat ~= nil then
        if not is_number(iat) then return nil, "iat is not a number" end
        if iat > now + leeway then return nil, "token issued in the future" end
    end
    if conf.issuers then
        if type(claims.iss) ~= "string" or not in_list(claims.iss, conf.issuers) then
            return nil, "issuer not accepted"
        end
    end
    if conf.audiences then
        local aud, ok = claims.aud, false
        if type(aud) == "string" then
            ok = in_list(aud, conf.audiences)
        elseif type(aud) == "table" then
            for _, a in ipairs(aud) do
                if type(a) == "string" and in_list(a, conf.audiences) then ok = true end
            end
        end
        if not ok then return nil, "audience not accepted" end
    end
    for _, name in ipairs(conf.required_claims) do
        local v = claims[name]
        if v == nil or v == json.null then return nil, "missing " .. name .. " claim" end
    end
    return true
end

--- P.verify(conf, token[, now]) -> claims, or nil, reason.
-- Pure: no request needed (the specs call it directly). `now` defaults to
-- gw.now(). The reason never contains the token.
-- Verified tokens per conf (one conf per route and generation): token ->
-- claims. A token is the exact bytes that were verified, so the same string
-- always verifies the same way under the same keys.
local verified = setmetatable({}, { __mode = "k" })

local function remember(conf, token, claims)
    local c = verified[conf]
    if not c or c.n >= conf.verified_cache then
        c = { n = 0, tokens = {} }
        verified[conf] = c
    end
    c.tokens[token] = claims
    c.n = c.n + 1
end

local verify_signed

function P.verify(conf, token, now)
    if type(token) ~= "string" or token == "" then return nil, "missing token" end
    if #token > conf.max_token_size then return nil, "token too large" end
    local c = verified[conf]
    local claims = c and c.tokens[token]
    if claims then
        local ok, err = check_claims(conf, claims, now or gw.now())
        if not ok then return nil, err end
        return claims
    end
    local err
    claims, err = verify_signed(conf, token)
    if not claims then return nil, err end
    local ok, cerr = check_claims(conf, claims, now or gw.now())
    if not ok then return nil, cerr end
    if (conf.verified_cache or 0) > 0 then remember(conf, token, claims) end
    return claims
end

-- Signature and structure only; claims are checked by the caller.
verify_signed = function(conf, token)
    local d1 = find(token, ".", 1, true)
    local d2 = d1 and find(token, ".", d1 + 1, true)
    if not d2 or find(token, ".", d2 + 1, true) then return nil, "malformed token" end
    local h64, p64, s64 = sub(token, 1, d1 - 1), sub(token, d1 + 1, d2 - 1), sub(token, d2 + 1)
    if h64 == "" or p64 == "" or s64 == "" then return nil, "malformed token" end

    local header = decode_json_object(h64)
    if not header then return nil, "malformed token header" end
    local alg = header.alg
    if type(alg) ~= "string" then return nil, "missing alg" end
    if lower(alg) == "none" then return nil, "alg none refused" end

    local keys = keys_of(conf)
    local key = keys.single
    if not key then
        local kid = header.kid
        if type(kid) ~= "string" then return nil, "missing kid" end
        key = keys.by_kid[kid]
        if type(key) ~= "table" then return nil, "unknown kid" end
    end
    if key.algs[alg] ~= true then return nil, "algorithm not allowed for this key" end

    local sig = crypto.base64url_decode(s64)
    if not sig or sig == "" then return nil, "malformed signature" end
    local input = sub(token, 1, d2 - 1)
    if key.secret then
        local mac = crypto.hmac(HMAC_ALGS[alg], key.secret, input)
        if not mac or not crypto.equal(mac, sig) then return nil, "signature mismatch" end
    else
        local ok = crypto.verify(key.pkey, alg, input, sig)
        if not ok then return nil, "signature mismatch" end
    end

    local claims = decode_json_object(p64)
    if not claims then return nil, "malformed token payload" end
    return claims
end

-- Header-safe text: printable ASCII and UTF-8, no control characters.
local function header_safe(s)
    return type(s) == "string" and s ~= "" and not find(s, "[%z\1-\31\127]")
end

--- P.consumer_of(conf, claims) -> { id, roles, claims }, or nil, reason.
function P.consumer_of(conf, claims)
    local id = claims[conf.consumer_claim]
    if is_number(id) then id = tostring(id) end
    if not header_safe(id) then return nil, "missing or invalid " .. conf.consumer_claim .. " claim" end
    local roles, raw = {}, claims[conf.roles_claim]
    local function add(r)
        if header_safe(r) and not find(r, ",", 1, true) then roles[#roles + 1] = r end
    end
    if type(raw) == "string" then
        for r in gmatch(raw, "%S+") do add(r) end
    elseif type(raw) == "table" then
        for _, r in ipairs(raw) do add(r) end
    end
    return { id = id, roles = roles, claims = claims }
end

local function cookie_value(ctx, name)
    local all = gw.request.get_headers(ctx).cookie
    if not all then return nil end
    if type(all) == "table" then all = concat(all, "; ") end
    for pair in gmatch(all, "[^;]+") do
        local k, v = pair:match("^%s*([^=%s]+)%s*=%s*(.-)%s*$")
        if k == name then return v end
    end
    return nil
end

local function unescape(s)
    return (gsub(s, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function query_value(ctx, name)
    for pair in gmatch(gw.request.get_query(ctx), "[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        if unescape(k) == name then return unescape(v) end
    end
    return nil
end

-- The token as the client sent it, or nil.
local function token_of(conf, ctx)
    if conf.header ~= "" then
        local v = gw.request.get_header(ctx, conf.header)
        if v then
            local t = v:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
            if t then return t end
            if lower(conf.header) ~= "authorization" then return (v:match("^%s*(.-)%s*$")) end
            -- another scheme (Basic ...) in Authorization: not ours
        end
    end
    if conf.cookie then
        local v = cookie_value(ctx, conf.cookie)
        if v and v ~= "" then return v end
    end
    if conf.query then
        local v = query_value(ctx, conf.query)
        if v and v ~= "" then return v end
    end
    return nil
end

local function quote(s) return (gsub(s, "[\"\\]", "")) end

-- On the admin listener's /metrics. Reasons are this file's fixed texts
-- (and claim names from the config): a bounded set.
local failures = gw.metrics.counter("moongate_auth_failures_total",
    "Requests refused by an auth plugin, by route, plugin and reason.",
    { "route", "plugin", "reason" })

local function count_failure(ctx, reason)
    failures:inc(1, { ctx.route and ctx.route.name or "", "jwt-auth", reason })
end

local function deny(ctx, reason)
    gw.log("info", "jwt-auth: ", reason, " (route ", ctx.route and ctx.route.name or "?", ")")
    count_failure(ctx, reason)
    return 401, { error = reason }, {
        ["WWW-Authenticate"] = 'Bearer error="invalid_token", error_description="'
            .. quote(reason) .. '"',
    }
end

--- Sets ctx.consumer and the upstream identity headers.
function P.set_identity(conf, ctx, consumer)
    ctx.consumer = consumer
    if conf.id_header ~= "" then gw.request.set_header(ctx, conf.id_header, consumer.id) end
    if conf.roles_header ~= "" then
        gw.request.set_header(ctx, conf.roles_header,
            #consumer.roles > 0 and concat(consumer.roles, ",") or nil)
    end
end

function P.access(conf, ctx)
    local token = token_of(conf, ctx)
    if not token then
        gw.log("info", "jwt-auth: missing token (route ", ctx.route and ctx.route.name or "?", ")")
        count_failure(ctx, "missing token")
        return 401, { error = "missing token" }, { ["WWW-Authenticate"] = "Bearer" }
    end
    local claims, err = P.verify(conf, token)
    if not claims then return deny(ctx, err) end
    local consumer
    consumer, err = P.consumer_of(conf, claims)
    if not consumer then return deny(ctx, err) end
    P.set_identity(conf, ctx, consumer)
end

return P
