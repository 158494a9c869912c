-- plugins/jwt-auth.lua against RFC 7520 ("Examples of Protecting Content
-- Using JOSE") section 4: the JWS compact serializations of 4.1 (RS256),
-- 4.2 (PS384), 4.3 (ES512) and 4.4 (HS256), verified with the published
-- keys of section 3 (Figures 1, 3 and 5) given to the plugin as JWKs and as
-- a keys-by-kid secret. The strings are the RFC's figures, line by line.
--
-- The payload of these examples is a quote from "The Fellowship of the
-- Ring", not a JSON object: the plugin verifies the signature first and
-- then refuses the payload ("malformed token payload"), so that answer
-- (and not "signature mismatch") proves the signature verified. Each
-- signature is also checked directly with gw.crypto.verify / hmac, and a
-- one-bit change must fail.
local bit = require("bit")
local gw = require("moongate.gw")
local schema = require("moongate.schema")

local crypto = gw.crypto
local concat = table.concat
local P = dofile("plugins/jwt-auth.lua")

local function conf(c)
    local out, errs = schema.validate(P.schema, c)
    assert(out, errs and concat(errs, "; "))
    return out
end

local KID = "bilbo.baggins@hobbiton.example"

-- Figure 1: Elliptic Curve P-521 Public Key
local EC_JWK = {
    kty = "EC", kid = KID, use = "sig", crv = "P-521",
    x = "AHKZLLOsCOzz5cY97ewNUajB957y-C-U88c3v13nmGZx6sYl_oJXu9"
        .. "A5RkTKqjqvjyekWF-7ytDyRXYgCF5cj0Kt",
    y = "AdymlHvOiLxXkEhayXQnNCvDX4h9htZaCJN34kfmC6pV5OhQHiraVy"
        .. "SsUdaQkAgDPrwQrJmbnX9cwlGfP-HqHZR1",
}

-- Figure 3: RSA 2048-Bit Public Key
local RSA_JWK = {
    kty = "RSA", kid = KID, use = "sig",
    n = concat({
        "n4EPtAOCc9AlkeQHPzHStgAbgs7bTZLwUBZdR8_KuKPEHLd4rHVTeT",
        "-O-XV2jRojdNhxJWTDvNd7nqQ0VEiZQHz_AJmSCpMaJMRBSFKrKb2wqV",
        "wGU_NsYOYL-QtiWN2lbzcEe6XC0dApr5ydQLrHqkHHig3RBordaZ6Aj-",
        "oBHqFEHYpPe7Tpe-OfVfHd1E6cS6M1FZcD1NNLYD5lFHpPI9bTwJlsde",
        "3uhGqC0ZCuEHg8lhzwOHrtIQbS0FVbb9k3-tVTU4fg_3L_vniUFAKwuC",
        "LqKnS2BYwdq_mzSnbLY7h_qixoR7jig3__kRhuaxwUkRz5iaiQkqgc5g",
        "HdrNP5zw",
    }),
    e = "AQAB",
}

-- Figure 5: HMAC SHA-256 Symmetric Key
local HMAC_KID = "018c0ae5-4d9b-471b-bfd6-eef314bc7037"
local HMAC_K = "hJtXIZ2uSN5kbQfbtTNWbpdmhkV8FJG-Onbc6mxCcYg"

-- Figure 8: Payload Content, base64url-encoded
local PAYLOAD = concat({
    "SXTigJlzIGEgZGFuZ2Vyb3VzIGJ1c2luZXNzLCBGcm9kbywgZ29pbmcgb3V0IH",
    "lvdXIgZG9vci4gWW91IHN0ZXAgb250byB0aGUgcm9hZCwgYW5kIGlmIHlvdSBk",
    "b24ndCBrZWVwIHlvdXIgZmVldCwgdGhlcmXigJlzIG5vIGtub3dpbmcgd2hlcm",
    "UgeW91IG1pZ2h0IGJlIHN3ZXB0IG9mZiB0by4",
})

-- Figures 13, 20, 27 and 34: JWS Compact Serializations (header, payload
-- = Figure 8, signature).
local function compact(header, sig) return concat(header) .. "." .. PAYLOAD .. "." .. concat(sig) end

local RS256 = compact({
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZX",
    "hhbXBsZSJ9",
}, {
    "MRjdkly7_-oTPTS3AXP41iQIGKa80A0ZmTuV5MEaHoxnW2e5CZ5NlKtainoFmK",
    "ZopdHM1O2U4mwzJdQx996ivp83xuglII7PNDi84wnB-BDkoBwA78185hX-Es4J",
    "IwmDLJK3lfWRa-XtL0RnltuYv746iYTh_qHRD68BNt1uSNCrUCTJDt5aAE6x8w",
    "W1Kt9eRo4QPocSadnHXFxnt8Is9UzpERV0ePPQdLuW3IS_de3xyIrDaLGdjluP",
    "xUAhb6L2aXic1U12podGU0KLUQSE_oI-ZnmKJ3F4uOZDnd6QZWJushZ41Axf_f",
    "cIe8u9ipH84ogoree7vjbU5y18kDquDg",
})

local PS384 = compact({
    "eyJhbGciOiJQUzM4NCIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZX",
    "hhbXBsZSJ9",
}, {
    "cu22eBqkYDKgIlTpzDXGvaFfz6WGoz7fUDcfT0kkOy42miAh2qyBzk1xEsnk2I",
    "pN6-tPid6VrklHkqsGqDqHCdP6O8TTB5dDDItllVo6_1OLPpcbUrhiUSMxbbXU",
    "vdvWXzg-UD8biiReQFlfz28zGWVsdiNAUf8ZnyPEgVFn442ZdNqiVJRmBqrYRX",
    "e8P_ijQ7p8Vdz0TTrxUeT3lm8d9shnr2lfJT8ImUjvAA2Xez2Mlp8cBE5awDzT",
    "0qI0n6uiP1aCN_2_jLAeQTlqRHtfa64QQSUmFAAjVKPbByi7xho0uTOcbH510a",
    "6GYmJUAfmWjwZ6oD4ifKo8DYM-X72Eaw",
})

local ES512 = compact({
    "eyJhbGciOiJFUzUxMiIsImtpZCI6ImJpbGJvLmJhZ2dpbnNAaG9iYml0b24uZX",
    "hhbXBsZSJ9",
}, {
    "AE_R_YZCChjn4791jSQCrdPZCNYqHXCTZH0-JZGYNlaAjP2kqaluUIIUnC9qvb",
    "u9Plon7KRTzoNEuT4Va2cmL1eJAQy3mtPBu_u_sDDyYjnAMDxXPn7XrT0lw-kv",
    "AD890jl8e2puQens_IEKBpHABlsbEPX6sFY8OcGDqoRuBomu9xQ2",
})

local HS256 = compact({
    "eyJhbGciOiJIUzI1NiIsImtpZCI6IjAxOGMwYWU1LTRkOWItNDcxYi1iZmQ2LW",
    "VlZjMxNGJjNzAzNyJ9",
}, {
    "s0h6KThzkfBBBkLspW1h84VsJZFTsPPqMDA7g1Md7p0",
})

local function parts(token)
    local h, p, s = token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    return h .. "." .. p, crypto.base64url_decode(s)
end

-- The token with one bit of its signature changed.
local function flipped(token)
    local input, sig = parts(token)
    local i = 10
    local bad = sig:sub(1, i - 1) .. string.char(bit.bxor(sig:byte(i), 1)) .. sig:sub(i + 1)
    return input .. "." .. crypto.base64url_encode(bad)
end

local function verifies(c, token)
    local claims, err = P.verify(c, token)
    assert.is_nil(claims)
    assert.are.equal("malformed token payload", err) -- the signature passed
    local _, bad = P.verify(c, flipped(token))
    assert.are.equal("signature mismatch", bad)
end

describe("jwt-auth RFC 7520 section 4 examples", function()
    it("decodes the payload of Figure 8 to the quote of Figure 7", function()
        assert.are.equal("It\226\128\153s a dangerous business, Frodo, going out your "
            .. "door. You step onto the road, and if you don't keep your feet, "
            .. "there\226\128\153s no knowing where you might be swept off to.",
            crypto.base64url_decode(PAYLOAD))
    end)

    it("verifies 4.1 (RS256) with the RSA public JWK of Figure 3", function()
        local key = assert(crypto.load_public_key(assert(P.jwk_to_pem(RSA_JWK))))
        local input, sig = parts(RS256)
        assert.is_true(crypto.verify(key, "RS256", input, sig))
        assert.is_false(crypto.verify(key, "RS256", input .. "x", sig))
        verifies(conf({ jwks = { keys = { RSA_JWK } }, jwks_algorithms = { "RS256" } }), RS256)
    end)

    it("verifies 4.2 (PS384, RSASSA-PSS) with the same RSA key", function()
        local key = assert(crypto.load_public_key(assert(P.jwk_to_pem(RSA_JWK))))
        local input, sig = parts(PS384)
        assert.is_true(crypto.verify(key, "PS384", input, sig))
        assert.is_false(crypto.verify(key, "PS256", input, sig))
        verifies(conf({ jwks = { keys = { RSA_JWK } }, jwks_algorithms = { "PS384" } }), PS384)
        -- the key's allowlist decides: RS256 only, the PS384 token is refused
        local _, err = P.verify(conf({ jwks = { keys = { RSA_JWK } }, jwks_algorithms = { "RS256" } }), PS384)
        assert.are.equal("algorithm not allowed for this key", err)
    end)

    it("verifies 4.3 (ES512) with the P-521 public JWK of Figure 1", function()
        local pem = assert(P.jwk_to_pem(EC_JWK))
        local key = assert(crypto.load_public_key(pem))
        assert.are.equal("EC", key.type)
        assert.are.equal(521, key.bits)
        local input, sig = parts(ES512)
        assert.are.equal(132, #sig)
        assert.is_true(crypto.verify(key, "ES512", input, sig))
        verifies(conf({ jwks = { keys = { EC_JWK } }, jwks_algorithms = { "ES512" } }), ES512)
        verifies(conf({ key = { public_key = pem, algorithms = { "ES512" } } }), ES512)
        -- and a P-521 key does not take ES256/ES384, nor a P-256 key ES512
        local out, errs = schema.validate(P.schema, { key = { public_key = pem, algorithms = { "ES256" } } })
        assert.is_nil(out)
        assert.matches("does not fit a 521%-bit EC key", concat(errs, "; "))
    end)

    it("refuses the ES512 psychic signature (r = s = 0)", function()
        local input = parts(ES512)
        local c = conf({ jwks = { keys = { EC_JWK } }, jwks_algorithms = { "ES512" } })
        local _, err = P.verify(c, input .. "." .. crypto.base64url_encode(string.rep("\0", 132)))
        assert.are.equal("signature mismatch", err)
    end)

    it("verifies 4.4 (HS256) with the symmetric key of Figure 5, by its kid", function()
        local input, sig = parts(HS256)
        assert.are.equal(sig, crypto.hmac("sha256", crypto.base64url_decode(HMAC_K), input))
        verifies(conf({ keys = { [HMAC_KID] = { secret = HMAC_K, secret_is_base64url = true,
            algorithms = { "HS256" } } } }), HS256)
        -- the same key material as a JWK is refused in a JWK Set: secrets go in key/keys
        local out, errs = schema.validate(P.schema, { jwks = { keys = { { kty = "oct", kid = HMAC_KID,
            use = "sig", alg = "HS256", k = HMAC_K } } } })
        assert.is_nil(out)
        assert.matches("does not belong in jwks", concat(errs, "; "))
    end)
end)
