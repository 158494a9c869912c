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
-- Keys: a single key, keys by kid, or a JWK Set given inline, read from a
-- file when the generation is built, or fetched from a URL / an upstream
-- with gw.http. A fetched set is kept in a shared dict (one fetch for the
-- whole gateway; a per-worker table when the zone is not declared) and
-- fetched again after jwks_max_age, or when a token names an unknown kid —
-- at most once per jwks_refresh_interval, one fetch at a time.
--
-- This file is past STYLE.md's ~400 lines; the plugin loader takes one file
-- per plugin (no plugins/<name>/init.lua yet), so the JWKS part stays here.
local gw = require("moongate.gw")

local type, pairs, ipairs, tostring, tonumber, setmetatable =
    type, pairs, ipairs, tostring, tonumber, setmetatable
local io_open, floor = io.open, math.floor
local find, sub, lower, gsub, gmatch, byte = string.find, string.sub, string.lower, string.gsub,
    string.gmatch, string.byte
local concat = table.concat
local crypto, json = gw.crypto, gw.json

local HMAC_ALGS = { HS256 = "sha256", HS384 = "sha384", HS512 = "sha512" }
-- Public-key algorithms by key type (and, for EC, by curve size in bits).
local PK_ALGS = {
    RS256 = "RSA", RS384 = "RSA", RS512 = "RSA",
    PS256 = "RSA", PS384 = "RSA", PS512 = "RSA",
    ES256 = "EC", ES384 = "EC", ES512 = "EC",
    EdDSA = "Ed25519",
}
local EC_BITS = { ES256 = 256, ES384 = 384, ES512 = 521 }
local CURVE_OF = { ES256 = "P-256", ES384 = "P-384", ES512 = "P-521" }

-- A JWK Set (file or fetched) larger than this is refused.
local JWKS_MAX_BYTES = 256 * 1024
-- Seconds between a worker's looks at the shared copy of a fetched set.
local JWKS_SYNC_EVERY = 1

local KEY_FIELDS = {
    secret = { type = "string", min_len = 1,
        description = "HMAC shared secret (HS256/384/512 only)" },
    secret_is_base64url = { type = "boolean", default = false,
        description = "the secret is base64url-encoded (as a JWK `k`); decoded once at load" },
    public_key = { type = "string",
        description = "PEM public key (SubjectPublicKeyInfo) for RS*, PS*, ES256/384/512 or EdDSA" },
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
            jwks_file = { type = "string", min_len = 1,
                description = "a file holding a JWK Set (JSON), read when the config generation is "
                    .. "built; a relative path is relative to the config file's directory" },
            jwks_url = { type = "string", pattern = "^http://",
                description = "URL of a JWK Set, http://IP[:port]/path, fetched with gw.http" },
            jwks_upstream = { type = "string", min_len = 1,
                description = "upstream (of this config) serving the JWK Set, fetched with gw.http" },
            jwks_path = { type = "string", pattern = "^/",
                description = "path of the JWK Set on jwks_upstream (default /.well-known/jwks.json)" },
            jwks_refresh_interval = { type = "number", default = 60, min = 1, max = 86400,
                description = "seconds: at most one fetch of a remote JWK Set per interval, for "
                    .. "unknown kids, max-age refreshes and retries after a failure alike" },
            jwks_max_age = { type = "number", default = 300, min = 1,
                description = "seconds after which a fetched JWK Set is fetched again (the old keys "
                    .. "serve meanwhile, and for as long as fetches fail)" },
            jwks_timeout = { type = "number", default = 5, min = 0.1, max = 60,
                description = "seconds for one fetch of a remote JWK Set" },
            jwks_shared = { type = "string", default = "jwks", pattern = "^[%w_-]+$",
                description = "shared dict (declared in the config's shared = { ... }) caching a "
                    .. "fetched JWK Set for all workers; undeclared: each worker fetches its own" },
            jwks_algorithms = { type = "array", items = { type = "string" },
                description = "algorithms for JWKs without an alg member (a JWK's own alg must also "
                    .. "be listed here when given); required with jwks_url / jwks_upstream" },
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
    ["P-384"] = { "\6\5\43\129\4\0\34", 48 }, ["P-521"] = { "\6\5\43\129\4\0\35", 66 } }
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

-- One JWK -> a key spec { kid, public_key = PEM, algorithms }, or nil, why.
-- The same rules for every JWK Set, whatever its source.
local function jwk_spec(conf, jwk)
    if type(jwk) ~= "table" then return nil, "is not a JSON object" end
    if type(jwk.kid) ~= "string" or jwk.kid == "" then return nil, "needs a kid" end
    if jwk.d ~= nil or jwk.p ~= nil or jwk.k ~= nil then
        return nil, "private or symmetric key material does not belong in jwks"
    end
    local pem, err = P.jwk_to_pem(jwk)
    if not pem then return nil, err end
    local algs
    if jwk.alg ~= nil then
        if type(jwk.alg) ~= "string" then return nil, "alg must be a string" end
        if conf.jwks_algorithms and not in_list(jwk.alg, conf.jwks_algorithms) then
            return nil, "alg " .. jwk.alg .. " is not in jwks_algorithms"
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
        if #algs == 0 then return nil, "no algorithm in jwks_algorithms fits this key" end
    else
        return nil, "has no alg and jwks_algorithms is not set"
    end
    return { kid = jwk.kid, public_key = pem, algorithms = algs }
end

-- A configured JWK Set (inline or file) -> { by_kid = compiled keys }, or
-- nil, why. Strict: one bad key refuses the config. `where` prefixes errors.
local function compile_set(conf, set, where)
    if type(set) ~= "table" or type(set.keys) ~= "table" then
        return nil, where .. "is not a JWK Set (a JSON object with a keys list)"
    end
    local by_kid, n = {}, 0
    for i, jwk in ipairs(set.keys) do
        local at = where .. "keys[" .. i .. "]: "
        local spec, err = jwk_spec(conf, jwk)
        if not spec then return nil, at .. err end
        if by_kid[spec.kid] then return nil, at .. "duplicate kid " .. spec.kid end
        local k, kerr = compile_key(spec)
        if not k then return nil, at .. "kid " .. spec.kid .. ": " .. kerr end
        by_kid[spec.kid] = k
        n = n + 1
    end
    if n == 0 then return nil, where .. "keys must not be empty" end
    return { by_kid = by_kid }
end

-- A relative jwks_file is taken from the config file's directory (the
-- runtime says which while it builds a generation), like plugin_paths.
local function config_path(path)
    if sub(path, 1, 1) == "/" then return path end
    local rt = package.loaded["moongate.runtime"]
    local dir = rt and rt.config_dir
    return dir and (dir .. "/" .. path) or path
end

-- Reads and decodes jwks_file (at load, never in a request).
local function read_jwks_file(conf)
    local path = config_path(conf.jwks_file)
    local f, err = io_open(path, "rb")
    if not f then return nil, "jwks_file: cannot read " .. tostring(err) end
    local text = f:read(JWKS_MAX_BYTES + 1)
    f:close()
    if text and #text > JWKS_MAX_BYTES then
        return nil, "jwks_file " .. path .. ": larger than " .. JWKS_MAX_BYTES .. " bytes"
    end
    local set, jerr = json.decode(text or "")
    if not set then return nil, "jwks_file " .. path .. ": not JSON: " .. tostring(jerr) end
    return set, path
end

local SOURCES = { "key", "keys", "jwks", "jwks_file", "jwks_url", "jwks_upstream" }
local JWKS_PATH = "/.well-known/jwks.json"

-- jwks_url must be something gw.http can reach: an IP literal, no names.
local function url_ok(url)
    local host = url:match("^http://([^/?#]+)/")
    if not host then return false end
    return host:find("^%d+%.%d+%.%d+%.%d+:?%d*$") ~= nil
        or host:find("^%[[%x:.]+%]:?%d*$") ~= nil
end

-- A remote set's config: the algorithms are the operator's, not the IdP's.
local function check_remote(conf)
    if conf.jwks_url and not url_ok(conf.jwks_url) then
        return nil, "jwks_url: must be http://IP[:port]/path (gw.http takes no host "
            .. "names: name the service with jwks_upstream instead)"
    end
    if not conf.jwks_algorithms or #conf.jwks_algorithms == 0 then
        return nil, "jwks_algorithms is required with jwks_url and jwks_upstream"
    end
    for _, alg in ipairs(conf.jwks_algorithms) do
        if not PK_ALGS[alg] then
            return nil, "jwks_algorithms: " .. alg .. " is not a public-key algorithm "
                .. "(RS*, PS*, ES256/384/512, EdDSA)"
        end
    end
    return { remote = true }
end

-- Compiles a whole conf: { single = key }, { by_kid = { kid = key } } or
-- { remote = true } (keys fetched at run time, see remote_key).
local function compile(conf)
    local n = 0
    for _, name in ipairs(SOURCES) do
        if conf[name] ~= nil then n = n + 1 end
    end
    if n ~= 1 then
        return nil, "needs exactly one of key, keys, jwks, jwks_file, jwks_url and jwks_upstream"
    end
    if conf.jwks_path and not conf.jwks_upstream then
        return nil, "jwks_path goes with jwks_upstream"
    end
    if conf.jwks_url or conf.jwks_upstream then return check_remote(conf) end
    if conf.jwks then return compile_set(conf, conf.jwks, "jwks.") end
    if conf.jwks_file then
        local set, path = read_jwks_file(conf)
        if not set then return nil, path end
        return compile_set(conf, set, "jwks_file " .. path .. ": ")
    end
    if conf.key then
        local k, err = compile_key(conf.key)
        if not k then return nil, "key: " .. err end
        return { single = k }
    end
    local by_kid, nk = {}, 0
    for kid, spec in pairs(conf.keys) do
        local k, err = compile_key(spec)
        if not k then return nil, "keys." .. kid .. ": " .. err end
        by_kid[kid] = k
        nk = nk + 1
    end
    if nk == 0 then return nil, "keys must not be empty" end
    return { by_kid = by_kid }
end

-- Compiled keys per conf table (a conf is one route's config of one
-- generation; the entry goes with it). schema.check builds them when the
-- generation is built, so a jwks_file is read then and never in a request.
local compiled = setmetatable({}, { __mode = "k" })

function P.schema.check(conf)
    local c, err = compile(conf)
    if not c then return nil, err end
    if conf.header == "" and not conf.cookie and not conf.query then
        return nil, "no place to look for the token (header, cookie or query)"
    end
    compiled[conf] = c
    return true
end

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

-- Remote JWK Sets (jwks_url, jwks_upstream) -------------------------------
--
-- The fetched set lives in a shared dict under three keys per source:
--   <src>|set   "<fetched at>\n<JSON of the usable JWKs>", no TTL: the last
--               good set stays until a better one replaces it;
--   <src>|ver   a counter bumped on each store, so a worker notices a new
--               set with one number read (at most once a second);
--   <src>|next  the fetch lock and rate limit in one: added as "busy" (only
--               one adder wins, across workers), then set to "done" for the
--               rest of jwks_refresh_interval; no fetch while it exists.
-- Each worker compiles the shared JSON into its own key objects.

-- A stand-in for a shared dict, private to this worker, when the zone is
-- not declared: the same logic, one fetch per worker instead of per gateway.
local Local = {}
Local.__index = Local

function Local:get(k)
    local exp = self.exp[k]
    if exp and exp <= gw.now() then self.v[k], self.exp[k] = nil, nil end
    return self.v[k]
end
function Local:set(k, v, ttl)
    self.v[k], self.exp[k] = v, (ttl and ttl > 0) and gw.now() + ttl or nil
    return true
end
function Local:add(k, v, ttl)
    if self:get(k) ~= nil then return false, "exists" end
    return self:set(k, v, ttl)
end
function Local:incr(k, delta, init)
    local v = (self:get(k) or init) + delta
    self.v[k] = v
    return v
end
function Local:delete(k) self.v[k], self.exp[k] = nil, nil end

local local_dicts = {}

local function dict_of(name)
    local d = gw.shared[name]
    if d then return d end
    d = local_dicts[name]
    if not d then
        gw.log("warn", "jwt-auth: no shared dict \"", name, "\" (declare it: shared = { ", name,
            " = \"1m\" }); each worker fetches and caches JWK Sets on its own")
        d = setmetatable({ v = {}, exp = {} }, Local)
        local_dicts[name] = d
    end
    return d
end

-- conf -> this worker's view of the conf's remote set: keys (compiled, or
-- nil before the first fetch), text (the JSON they came from), fetched
-- (when), ver (the shared version seen), sync_at (next look at the dict).
local remote = setmetatable({}, { __mode = "k" })

local function remote_state(conf)
    local st = remote[conf]
    if st then return st end
    local src = conf.jwks_url or ("upstream " .. conf.jwks_upstream .. (conf.jwks_path or JWKS_PATH))
    local base = "jwt-auth|" .. src .. "|"
    st = { dict = dict_of(conf.jwks_shared), src = src, k_set = base .. "set",
        k_ver = base .. "ver", k_next = base .. "next", sync_at = 0 }
    remote[conf] = st
    return st
end

--- P.fetch_jwks(conf) -> response body, or nil, why. Waits (gw.http): a
-- GET of jwks_url, or of jwks_path on jwks_upstream.
function P.fetch_jwks(conf)
    local req = { timeout = conf.jwks_timeout, headers = { Accept = "application/json" } }
    if conf.jwks_url then
        req.url = conf.jwks_url
    else
        req.upstream, req.path = conf.jwks_upstream, conf.jwks_path or JWKS_PATH
    end
    local res, err = gw.http.request(req)
    if not res then return nil, err end
    if res.status ~= 200 then return nil, "status " .. res.status end
    if #res.body > JWKS_MAX_BYTES then return nil, "larger than " .. JWKS_MAX_BYTES .. " bytes" end
    return res.body
end

-- The JWKs of a fetched set worth keeping (a public signing key with a
-- kid, once per kid), or nil, why. The others are left out, each with a
-- log line; encryption keys (use = "enc") silently.
local function usable_jwks(set, src)
    if type(set) ~= "table" or type(set.keys) ~= "table" then
        return nil, "not a JWK Set (a JSON object with a keys list)"
    end
    local out, seen = {}, {}
    for i, jwk in ipairs(set.keys) do
        local why
        if type(jwk) ~= "table" then
            why = "is not a JSON object"
        elseif jwk.use ~= "enc" then
            if type(jwk.kid) ~= "string" or jwk.kid == "" then
                why = "needs a kid"
            elseif jwk.d ~= nil or jwk.p ~= nil or jwk.k ~= nil then
                why = "private or symmetric key material refused"
            elseif seen[jwk.kid] then
                why = "duplicate kid"
            else
                local _, err = P.jwk_to_pem(jwk)
                why = err
            end
            if not why then
                seen[jwk.kid] = true
                -- only what a public key needs goes on (and into the dict)
                out[#out + 1] = { kty = jwk.kty, kid = jwk.kid, alg = jwk.alg, crv = jwk.crv,
                    n = jwk.n, e = jwk.e, x = jwk.x, y = jwk.y }
            end
        end
        if why then
            gw.log("warn", "jwt-auth: JWK Set from ", src, ": keys[", i, "] (kid ",
                type(jwk) == "table" and tostring(jwk.kid) or "?", ") left out: ", why)
        end
    end
    if #out == 0 then return nil, "no usable key in the set" end
    return out
end

-- Usable JWKs -> { by_kid, kids } for this conf's algorithms, or nil, why.
-- A key none of the algorithms fits is left out (logged when `loud`).
local function compile_fetched(conf, jwks, src, loud)
    local by_kid, kids = {}, {}
    for _, jwk in ipairs(jwks) do
        local spec, err = jwk_spec(conf, jwk)
        local k
        if spec then k, err = compile_key(spec) end
        if k then
            by_kid[jwk.kid] = k
            kids[#kids + 1] = jwk.kid
        elseif loud then
            gw.log("warn", "jwt-auth: JWK Set from ", src, ": kid ", tostring(jwk.kid),
                " left out: ", err)
        end
    end
    if #kids == 0 then return nil, "no key of the set fits jwks_algorithms" end
    return { by_kid = by_kid, kids = kids }
end

-- Takes the shared copy of the set when it changed since this worker looked.
local function sync(conf, st, now)
    st.sync_at = now + JWKS_SYNC_EVERY
    local ver = st.dict:get(st.k_ver)
    if ver == nil or ver == st.ver then return end
    local blob = st.dict:get(st.k_set)
    if type(blob) ~= "string" then return end
    local t, text = blob:match("^([%d.]+)\n(.*)$")
    if not t then return end
    st.ver, st.fetched = ver, tonumber(t)
    if text == st.text then return end
    local set = json.decode(text)
    local keys = type(set) == "table" and type(set.keys) == "table"
        and compile_fetched(conf, set.keys, st.src, false)
    if keys then st.keys, st.text = keys, text end
end

local function lock_ttl(conf)
    return conf.jwks_refresh_interval > conf.jwks_timeout + 1 and conf.jwks_refresh_interval
        or conf.jwks_timeout + 1
end

-- Fetches the set and publishes it (this coroutine waits). The caller won
-- the <src>|next lock at `started`; it is released here into the rate
-- limit, after the new set (if any) is in the dict for the waiters.
local function fetch(conf, st, started)
    local ok, body, err = pcall(P.fetch_jwks, conf)
    if not ok then body, err = nil, tostring(body) end
    local jwks, keys, text
    if body then
        jwks, err = usable_jwks(json.decode(body), st.src)
        if jwks then keys, err = compile_fetched(conf, jwks, st.src, true) end
        text = keys and json.encode({ keys = jwks })
    end
    local now = gw.now()
    if keys then
        if text ~= st.text then
            st.keys, st.text = keys, text
            gw.log("info", "jwt-auth: JWK Set from ", st.src, ": kids ", concat(keys.kids, ", "))
        end
        st.fetched = now
        local sok, serr = st.dict:set(st.k_set, string.format("%.3f\n", now) .. text)
        if sok then
            st.ver = st.dict:incr(st.k_ver, 1, floor(now * 1000))
        else
            gw.log("warn", "jwt-auth: cannot keep the JWK Set from ", st.src, " in shared dict \"",
                conf.jwks_shared, "\": ", tostring(serr))
        end
    else
        gw.log("warn", "jwt-auth: fetching the JWK Set from ", st.src, " failed: ", tostring(err),
            st.keys and " (keeping the last good keys)" or " (no keys yet)")
    end
    local left = started + conf.jwks_refresh_interval - now
    if left > 0 then st.dict:set(st.k_next, "done", left) else st.dict:delete(st.k_next) end
end

-- This worker's state for a remote conf, synced with the shared copy at
-- most once a second; a set older than jwks_max_age is fetched again in a
-- timer (the request goes on with the keys there are).
local function remote_keys(conf, now)
    local st = remote_state(conf)
    if now >= st.sync_at then
        sync(conf, st, now)
        if st.keys and now >= st.fetched + conf.jwks_max_age
            and st.dict:add(st.k_next, "busy", lock_ttl(conf)) then
            local ok, err = gw.timer.at(0, fetch, conf, st, now)
            if not ok then
                st.dict:delete(st.k_next)
                gw.log("warn", "jwt-auth: cannot start a JWK Set refresh: ", tostring(err))
            end
        end
    end
    return st
end

-- The key for `kid` of a remote set, or nil, why. An unknown kid (or no
-- keys yet) fetches the set when the rate limit allows, or waits for the
-- fetch in flight (bounded by jwks_timeout); otherwise it is refused at once.
local function remote_key(conf, kid)
    local now = gw.now()
    local st = remote_keys(conf, now)
    local key = st.keys and st.keys.by_kid[kid]
    if key then return key end
    sync(conf, st, now)
    key = st.keys and st.keys.by_kid[kid]
    if key then return key end
    if st.dict:add(st.k_next, "busy", lock_ttl(conf)) then
        fetch(conf, st, now)
    elseif st.dict:get(st.k_next) == "busy" then
        local deadline = now + conf.jwks_timeout + 1
        repeat gw.sleep(0.02) until st.dict:get(st.k_next) ~= "busy" or gw.now() >= deadline
        sync(conf, st, gw.now())
    end
    key = st.keys and st.keys.by_kid[kid]
    if key then return key end
    return nil, st.keys and "unknown kid" or "signing keys unavailable"
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

-- Verified tokens per conf (one conf per route and generation): token ->
-- claims. A token is the exact bytes that were verified, so the same string
-- always verifies the same way under the same keys; with a remote JWK Set
-- the entries also hold the key set they were verified with, and a new set
-- (a rotation may have dropped a key) empties the cache.
local verified = setmetatable({}, { __mode = "k" })

local function remember(conf, token, claims, set)
    local c = verified[conf]
    if not c or c.n >= conf.verified_cache or c.set ~= set then
        c = { n = 0, tokens = {}, set = set }
        verified[conf] = c
    end
    c.tokens[token] = claims
    c.n = c.n + 1
end

local verify_signed

--- P.verify(conf, token[, now]) -> claims, or nil, reason.
-- No request needed (the specs call it directly); with jwks_url or
-- jwks_upstream it may wait for a fetch of the JWK Set (access phase,
-- timers, scripts). `now` (for the claims) defaults to gw.now(). The reason
-- never contains the token.
function P.verify(conf, token, now)
    if type(token) ~= "string" or token == "" then return nil, "missing token" end
    if #token > conf.max_token_size then return nil, "token too large" end
    local set
    if keys_of(conf).remote then set = remote_keys(conf, gw.now()).keys end
    local c = verified[conf]
    local claims = c and c.set == set and c.tokens[token]
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
    if (conf.verified_cache or 0) > 0 then
        if keys_of(conf).remote then set = remote[conf].keys end -- a fetch may have replaced it
        remember(conf, token, claims, set)
    end
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
        if keys.remote then
            local err
            key, err = remote_key(conf, kid)
            if not key then return nil, err end
        else
            key = keys.by_kid[kid]
            if type(key) ~= "table" then return nil, "unknown kid" end
        end
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
local function consumer_of(conf, claims)
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

-- Consumers of cached tokens' claims (the same claims table for the same
-- token), so a repeated token does not rebuild its roles. Each request
-- still gets a consumer table of its own: plugins may write to it.
local consumers = setmetatable({}, { __mode = "k" })

function P.consumer_of(conf, claims)
    local by_conf = consumers[claims]
    local base = by_conf and by_conf[conf]
    if not base then
        local err
        base, err = consumer_of(conf, claims)
        if not base then return nil, err end
        base.roles_header = #base.roles > 0 and concat(base.roles, ",") or nil
        by_conf = by_conf or setmetatable({}, { __mode = "k" })
        by_conf[conf] = base
        consumers[claims] = by_conf
    end
    local roles = {}
    for i = 1, #base.roles do roles[i] = base.roles[i] end
    return { id = base.id, roles = roles, claims = claims }, base.roles_header
end

local function is_space(b) return b == 32 or (b >= 9 and b <= 13) end

-- The token of "Bearer <token>" (scheme case-insensitive), or nil.
-- Without patterns (string.match is not compiled by the JIT and this runs
-- on every request): the ends are trimmed byte by byte, and plain finds
-- (compiled, memchr-fast) make sure no whitespace is left inside.
local function bearer_token(v)
    local i, n = 1, #v
    while i <= n and is_space(byte(v, i)) do i = i + 1 end
    while n >= i and is_space(byte(v, n)) do n = n - 1 end
    if n - i < 7 or lower(sub(v, i, i + 5)) ~= "bearer" or not is_space(byte(v, i + 6)) then
        return nil
    end
    i = i + 7
    while is_space(byte(v, i)) do i = i + 1 end
    local token = sub(v, i, n)
    if find(token, " ", 1, true) or find(token, "\t", 1, true) or find(token, "\v", 1, true)
        or find(token, "\f", 1, true) then
        return nil
    end
    return token
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
P.bearer_token = bearer_token -- for the specs

local function token_of(conf, ctx)
    if conf.header ~= "" then
        local v = gw.request.get_header(ctx, conf.header)
        if v then
            local t = bearer_token(v)
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
function P.set_identity(conf, ctx, consumer, roles_header)
    ctx.consumer = consumer
    if conf.id_header ~= "" then gw.request.set_header(ctx, conf.id_header, consumer.id) end
    if conf.roles_header ~= "" then
        if roles_header == nil and #consumer.roles > 0 then
            roles_header = concat(consumer.roles, ",")
        end
        gw.request.set_header(ctx, conf.roles_header, roles_header)
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
    local consumer, roles_header = P.consumer_of(conf, claims)
    if not consumer then return deny(ctx, roles_header) end
    P.set_identity(conf, ctx, consumer, roles_header)
end

return P
