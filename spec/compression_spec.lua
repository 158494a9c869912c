-- plugins/compression.lua: Accept-Encoding negotiation (q-values, q=0, `*`,
-- identity, malformed entries), which responses are eligible (status,
-- method, type, length, existing encodings, ranges, no-transform), ETag
-- weakening and the config checks. The phases on the wire are in
-- tests/e2e/test_compression.py.

local P = dofile("plugins/compression.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

describe("compression negotiation", function()
    local both = { "br", "gzip" }
    local cases = {
        -- Accept-Encoding, offered, expected
        { nil, both, nil },
        { "", both, nil },
        { "identity", both, nil },
        { "gzip", both, "gzip" },
        { "GZip", both, "gzip" },
        { "x-gzip", both, "gzip" },
        { "br", both, "br" },
        { "gzip, deflate, br", both, "br" },          -- tie: our preference
        { "gzip, deflate, br", { "gzip", "br" }, "gzip" },
        { "gzip;q=1.0, br;q=0.5", both, "gzip" },
        { "br;q=0.8, gzip;q=0.9", both, "gzip" },
        { "br;q=0, gzip", both, "gzip" },
        { "gzip;q=0", both, nil },
        { "gzip;q=0.000, br;q=0", both, nil },
        { "*", both, "br" },
        { "*;q=0.5, br;q=0", both, "gzip" },
        { "*;q=0", both, nil },
        { "gzip;q=0, *", both, "br" },
        { "identity;q=1, *;q=0", both, nil },
        { "deflate, zstd", both, nil },
        { "br", { "gzip" }, nil },
        { " gzip ; q=0.3 , br ; q=0.2 ", both, "gzip" },
        { "gzip;q=2", both, nil },                   -- malformed q: entry ignored
        { "gzip;q=abc, br", both, "br" },
        { "gzip;level=9", both, nil },               -- unknown parameter: ignored
        { "gzip;q=0.001", both, "gzip" },
        { "gzip,,,br;q=0.1", both, "gzip" },
        { "gzip;q=0, gzip;q=0.5", both, "gzip" },    -- repeated: the higher q counts
    }
    for _, c in ipairs(cases) do
        it(string.format("picks %s for %q offering %s", tostring(c[3]), tostring(c[1]),
            table.concat(c[2], ",")), function()
            assert.are.equal(c[3], P.negotiate(c[1], c[2]))
        end)
    end
end)

describe("compression eligibility", function()
    local c = conf({})
    local function h(t)
        t = t or {}
        if t["content-type"] == nil then t["content-type"] = "application/json" end
        if t["content-type"] == false then t["content-type"] = nil end
        return t
    end

    it("takes the default text, JSON, JS, XML and SVG types, with parameters", function()
        for _, t in ipairs({ "text/html", "text/plain; charset=utf-8", "TEXT/CSS",
            "application/json", "application/json;charset=UTF-8", "application/javascript",
            "application/xml", "image/svg+xml" }) do
            assert.is_true(P.eligible(c, "GET", 200, h({ ["content-type"] = t })), t)
        end
    end)

    it("refuses images, binaries, other types and a missing Content-Type", function()
        for _, t in ipairs({ "image/png", "image/jpeg", "application/octet-stream",
            "application/zip", "video/mp4", "application/jsonx", "text" }) do
            assert.is_false((P.eligible(c, "GET", 200, h({ ["content-type"] = t }))), t)
        end
        assert.is_false((P.eligible(c, "GET", 200, h({ ["content-type"] = false }))))
    end)

    it("leaves HEAD, 1xx, 204, 304, 206 and Content-Range alone", function()
        assert.is_false((P.eligible(c, "HEAD", 200, h())))
        assert.is_false((P.eligible(c, "GET", 204, h())))
        assert.is_false((P.eligible(c, "GET", 304, h())))
        assert.is_false((P.eligible(c, "GET", 101, h())))
        assert.is_false((P.eligible(c, "GET", 206, h())))
        assert.is_false((P.eligible(c, "GET", 200, h({ ["content-range"] = "bytes 0-1/2" }))))
        assert.is_true(P.eligible(c, "GET", 404, h()))
        assert.is_true(P.eligible(c, "POST", 201, h()))
    end)

    it("never compresses twice", function()
        for _, ce in ipairs({ "gzip", "br", "deflate", "zstd", "GZIP" }) do
            assert.is_false((P.eligible(c, "GET", 200, h({ ["content-encoding"] = ce }))), ce)
        end
        assert.is_false((P.eligible(c, "GET", 200, h({ ["content-encoding"] = { "gzip", "br" } }))))
        assert.is_true(P.eligible(c, "GET", 200, h({ ["content-encoding"] = "identity" })))
    end)

    it("skips bodies known to be shorter than min_length, not unknown lengths", function()
        assert.is_false((P.eligible(c, "GET", 200, h({ ["content-length"] = "255" }))))
        assert.is_true(P.eligible(c, "GET", 200, h({ ["content-length"] = "256" })))
        assert.is_true(P.eligible(c, "GET", 200, h()))
        local c0 = conf({ min_length = 0 })
        assert.is_true(P.eligible(c0, "GET", 200, h({ ["content-length"] = "0" })))
    end)

    it("honours Cache-Control: no-transform", function()
        local cc = h({ ["cache-control"] = "public, No-Transform" })
        assert.is_false((P.eligible(c, "GET", 200, cc)))
        assert.is_true(P.eligible(c, "GET", 200, h({ ["cache-control"] = "max-age=60" })))
    end)

    it("matches configured exact types and type/* wildcards only", function()
        local c2 = conf({ types = { "application/vnd.api+json", "font/*" } })
        local api = h({ ["content-type"] = "application/vnd.api+json" })
        assert.is_true(P.eligible(c2, "GET", 200, api))
        assert.is_true(P.eligible(c2, "GET", 200, h({ ["content-type"] = "font/ttf" })))
        assert.is_false((P.eligible(c2, "GET", 200, h({ ["content-type"] = "text/html" }))))
    end)
end)

describe("compression helpers and config", function()
    it("weakens strong ETags and keeps weak ones", function()
        assert.are.equal('W/"abc"', P.weak_etag('"abc"'))
        assert.are.equal('W/"abc"', P.weak_etag('W/"abc"'))
    end)

    it("fills defaults", function()
        local c = conf({})
        assert.are.same({ "br", "gzip" }, c.encodings)
        assert.are.equal(1, c.gzip_level)
        assert.are.equal(4, c.brotli_quality)
        assert.are.equal(256, c.min_length)
    end)

    it("refuses bad levels, encodings and types", function()
        refused({ gzip_level = 0 }, "gzip_level: must be at least 1")
        refused({ gzip_level = 10 }, "gzip_level")
        refused({ brotli_quality = 12 }, "brotli_quality")
        refused({ encodings = { "deflate" } }, "encodings")
        refused({ encodings = {} }, "encodings must not be empty")
        refused({ types = { "json" } }, "not a media type: json")
        refused({ min_length = -1 }, "min_length")
        refused({ level = 3 }, "unknown field")
    end)
end)
