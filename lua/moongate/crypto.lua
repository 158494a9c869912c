-- gw.crypto: digests, HMAC, signature verification and base64(url), from
-- OpenSSL's libcrypto through the FFI. Keys are parsed once (per config
-- generation, by the plugin that owns them) into key objects; verification
-- takes the algorithm from the caller (the key's configuration), never
-- from the data being verified (SECURITY.md point 8).
local ffi = require("ffi")

local ffi_new, ffi_string, ffi_gc = ffi.new, ffi.string, ffi.gc
local type, error, tostring = type, error, tostring
local gsub, rep = string.gsub, string.rep

ffi.cdef [[
typedef struct evp_md_st EVP_MD;
typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_pkey_st EVP_PKEY;
typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct bio_st BIO;
typedef struct ECDSA_SIG_st ECDSA_SIG;
typedef struct bignum_st BIGNUM;

const EVP_MD *EVP_get_digestbyname(const char *name);
int EVP_Digest(const void *data, size_t count, unsigned char *md,
               unsigned int *size, const EVP_MD *type, void *impl);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                    const unsigned char *data, size_t data_len,
                    unsigned char *md, unsigned int *md_len);
int EVP_EncodeBlock(unsigned char *t, const unsigned char *f, int n);
int EVP_DecodeBlock(unsigned char *t, const unsigned char *f, int n);
int RAND_bytes(unsigned char *buf, int num);
typedef struct hmac_ctx_st HMAC_CTX;
HMAC_CTX *HMAC_CTX_new(void);
void HMAC_CTX_free(HMAC_CTX *ctx);
int HMAC_Init_ex(HMAC_CTX *ctx, const void *key, int len, const EVP_MD *md, void *impl);
int HMAC_Update(HMAC_CTX *ctx, const unsigned char *data, size_t len);
int HMAC_Final(HMAC_CTX *ctx, unsigned char *md, unsigned int *len);
int CRYPTO_memcmp(const void *a, const void *b, size_t len);

BIO *BIO_new_mem_buf(const void *buf, int len);
int BIO_free(BIO *a);
EVP_PKEY *PEM_read_bio_PUBKEY(BIO *bp, EVP_PKEY **x, void *cb, void *u);
void EVP_PKEY_free(EVP_PKEY *pkey);
int EVP_PKEY_get_base_id(const EVP_PKEY *pkey);
int EVP_PKEY_get_bits(const EVP_PKEY *pkey);

EVP_MD_CTX *EVP_MD_CTX_new(void);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int EVP_DigestVerifyInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx,
                         const EVP_MD *type, void *e, EVP_PKEY *pkey);
int EVP_DigestVerify(EVP_MD_CTX *ctx, const unsigned char *sig, size_t siglen,
                     const unsigned char *tbs, size_t tbslen);
int EVP_PKEY_CTX_set_rsa_padding(EVP_PKEY_CTX *ctx, int pad_mode);
int EVP_PKEY_CTX_set_rsa_pss_saltlen(EVP_PKEY_CTX *ctx, int saltlen);

ECDSA_SIG *ECDSA_SIG_new(void);
void ECDSA_SIG_free(ECDSA_SIG *sig);
int ECDSA_SIG_set0(ECDSA_SIG *sig, BIGNUM *r, BIGNUM *s);
BIGNUM *BN_bin2bn(const unsigned char *s, int len, BIGNUM *ret);
void BN_free(BIGNUM *a);
int i2d_ECDSA_SIG(const ECDSA_SIG *sig, unsigned char **pp);
]]

local C = ffi.load("libcrypto.so.3")

local EVP_PKEY_RSA, EVP_PKEY_EC, EVP_PKEY_ED25519 = 6, 408, 1087
local RSA_PKCS1_PSS_PADDING, RSA_PSS_SALTLEN_DIGEST = 6, -1

local _M = {}

local md_out = ffi_new("unsigned char[64]")
local md_len = ffi_new("unsigned int[1]")

local DIGESTS = { sha1 = "SHA1", sha256 = "SHA256", sha384 = "SHA384", sha512 = "SHA512" }

local function digest_of(alg)
    local name = DIGESTS[alg]
    local md = name and C.EVP_get_digestbyname(name)
    if md == nil then error("unknown digest " .. tostring(alg) .. " (sha1, sha256, sha384, sha512)", 3) end
    return md
end

--- gw.crypto.digest("sha256", data) -> raw digest bytes.
function _M.digest(alg, data)
    if C.EVP_Digest(data, #data, md_out, md_len, digest_of(alg), nil) ~= 1 then
        return nil, "digest failed"
    end
    return ffi_string(md_out, md_len[0])
end

-- HMAC contexts keyed by algorithm and key, set up once: OpenSSL 3's
-- one-shot HMAC() looks the digest implementation up on every call, which
-- costs more than the MAC itself for a token-sized input. Keys come from
-- configs, so there are few; the cache is dropped if it ever grows large.
local hmac_ctxs, hmac_count = {}, 0

local function hmac_ctx(alg, key)
    local per_alg = hmac_ctxs[alg]
    local ctx = per_alg and per_alg[key]
    if ctx then return ctx end
    if hmac_count >= 256 then hmac_ctxs, hmac_count = {}, 0 end
    ctx = C.HMAC_CTX_new()
    if ctx == nil then return nil end
    ctx = ffi_gc(ctx, C.HMAC_CTX_free)
    if C.HMAC_Init_ex(ctx, key, #key, digest_of(alg), nil) ~= 1 then return nil end
    hmac_ctxs[alg] = per_alg or {}
    hmac_ctxs[alg][key] = ctx
    hmac_count = hmac_count + 1
    return ctx
end

--- gw.crypto.hmac("sha256", key, data) -> raw MAC bytes.
function _M.hmac(alg, key, data)
    if type(key) ~= "string" or type(data) ~= "string" then error("key and data must be strings", 2) end
    local ctx = hmac_ctx(alg, key)
    -- NULL key and md: start over with the key and digest it was set up with.
    if not ctx or C.HMAC_Init_ex(ctx, nil, 0, nil, nil) ~= 1
        or C.HMAC_Update(ctx, data, #data) ~= 1
        or C.HMAC_Final(ctx, md_out, md_len) ~= 1 then
        return nil, "hmac failed"
    end
    return ffi_string(md_out, md_len[0])
end

--- gw.crypto.equal(a, b) -> true when equal, in time independent of content.
function _M.equal(a, b)
    if type(a) ~= "string" or type(b) ~= "string" or #a ~= #b then return false end
    return C.CRYPTO_memcmp(a, b, #a) == 0
end

--- gw.crypto.random(n) -> n random bytes.
function _M.random(n)
    local buf = ffi_new("unsigned char[?]", n)
    if C.RAND_bytes(buf, n) ~= 1 then return nil, "no randomness" end
    return ffi_string(buf, n)
end

--- gw.crypto.base64_encode(s) / base64_decode(s) -> string (decode: nil on bad input).
function _M.base64_encode(s)
    local out = ffi_new("unsigned char[?]", 4 * math.floor((#s + 2) / 3) + 1)
    local n = C.EVP_EncodeBlock(out, s, #s)
    return ffi_string(out, n)
end

function _M.base64_decode(s)
    if type(s) ~= "string" or #s % 4 ~= 0 or s:find("[^%w+/=]") then return nil end
    if s:find("=[^=]") then return nil end
    local out = ffi_new("unsigned char[?]", #s)
    local n = C.EVP_DecodeBlock(out, s, #s)
    if n < 0 then return nil end
    local pad = #s > 0 and (s:sub(-2) == "==" and 2 or s:sub(-1) == "=" and 1 or 0) or 0
    return ffi_string(out, n - pad)
end

--- gw.crypto.base64url_encode(s) -> unpadded base64url (RFC 4648 section 5).
function _M.base64url_encode(s)
    return (gsub(gsub(_M.base64_encode(s), "[+/]", { ["+"] = "-", ["/"] = "_" }), "=+$", ""))
end

--- gw.crypto.base64url_decode(s) -> bytes or nil (strict: no padding, url alphabet).
function _M.base64url_decode(s)
    if type(s) ~= "string" or s:find("[^%w_-]") or #s % 4 == 1 then return nil end
    local b64 = gsub(s, "[-_]", { ["-"] = "+", ["_"] = "/" })
    return _M.base64_decode(b64 .. rep("=", (4 - #b64 % 4) % 4))
end

--- gw.crypto.load_public_key(pem) -> key or nil, err. Parse once per config.
-- key.type is "RSA", "EC" or "Ed25519"; key.bits its size.
function _M.load_public_key(pem)
    if type(pem) ~= "string" then error("pem must be a string", 2) end
    local bio = C.BIO_new_mem_buf(pem, #pem)
    if bio == nil then return nil, "out of memory" end
    local pkey = C.PEM_read_bio_PUBKEY(bio, nil, nil, nil)
    C.BIO_free(bio)
    if pkey == nil then return nil, "not a PEM public key" end
    pkey = ffi_gc(pkey, C.EVP_PKEY_free)
    local id = C.EVP_PKEY_get_base_id(pkey)
    local kind = (id == EVP_PKEY_RSA and "RSA") or (id == EVP_PKEY_EC and "EC")
        or (id == EVP_PKEY_ED25519 and "Ed25519")
    if not kind then return nil, "unsupported key type" end
    return { pkey = pkey, type = kind, bits = C.EVP_PKEY_get_bits(pkey) }
end

-- Raw r||s (JWS) -> DER, refusing r = 0 or s = 0 outright.
local function ecdsa_der(sig, size)
    if #sig ~= 2 * size then return nil end
    local r, s = sig:sub(1, size), sig:sub(size + 1)
    if r == rep("\0", size) or s == rep("\0", size) then return nil end
    local es = C.ECDSA_SIG_new()
    local br = C.BN_bin2bn(r, size, nil)
    local bs = C.BN_bin2bn(s, size, nil)
    C.ECDSA_SIG_set0(es, br, bs)
    local len = C.i2d_ECDSA_SIG(es, nil)
    local buf = ffi_new("unsigned char[?]", len)
    local pp = ffi_new("unsigned char*[1]", buf)
    C.i2d_ECDSA_SIG(es, pp)
    C.ECDSA_SIG_free(es)
    return ffi_string(buf, len)
end

-- JWS algorithm -> what verification needs.
local ALGS = {
    RS256 = { "RSA", "sha256" }, RS384 = { "RSA", "sha384" }, RS512 = { "RSA", "sha512" },
    PS256 = { "RSA", "sha256", pss = true }, PS384 = { "RSA", "sha384", pss = true },
    PS512 = { "RSA", "sha512", pss = true },
    ES256 = { "EC", "sha256", size = 32 }, ES384 = { "EC", "sha384", size = 48 },
    ES512 = { "EC", "sha512", size = 66 },
    EdDSA = { "Ed25519" },
}

--- gw.crypto.verify(key, "RS256", data, signature) -> true, or false, reason.
-- The algorithm must be one the key's type supports (an RSA key never
-- verifies ES256, an HMAC secret is never a key here).
function _M.verify(key, alg, data, sig)
    local a = ALGS[alg]
    if not a then return false, "unsupported algorithm" end
    if type(key) ~= "table" or key.type ~= a[1] then return false, "key does not fit the algorithm" end
    if type(data) ~= "string" or type(sig) ~= "string" then return false, "bad input" end
    if a.size then
        sig = ecdsa_der(sig, a.size)
        if not sig then return false, "bad signature" end
    end
    if a[1] == "RSA" and key.bits < 2048 then return false, "RSA key too small" end
    local ctx = C.EVP_MD_CTX_new()
    if ctx == nil then return false, "out of memory" end
    local pctx = ffi_new("EVP_PKEY_CTX*[1]")
    local md = a[2] and digest_of(a[2]) or nil
    local ok = C.EVP_DigestVerifyInit(ctx, pctx, md, nil, key.pkey) == 1
    if ok and a.pss then
        ok = C.EVP_PKEY_CTX_set_rsa_padding(pctx[0], RSA_PKCS1_PSS_PADDING) == 1
            and C.EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx[0], RSA_PSS_SALTLEN_DIGEST) == 1
    end
    ok = ok and C.EVP_DigestVerify(ctx, sig, #sig, data, #data) == 1
    C.EVP_MD_CTX_free(ctx)
    if not ok then return false, "signature mismatch" end
    return true
end

return _M
