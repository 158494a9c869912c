-- plugins/ip-restriction.lua: CIDR parsing and matching in pure Lua (IPv4,
-- IPv6, IPv4-mapped), the allow/deny decision, and configs the schema check
-- refuses. The 403 answers and trusted_proxies are exercised in
-- tests/e2e/test_everyday_plugins.py.

local P = dofile("plugins/ip-restriction.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

local function inside(cidr, ip)
    local net = assert(P.parse_cidr(cidr))
    return P.match(net, assert(P.parse_ip(ip)))
end

describe("ip-restriction address parsing", function()
    it("parses IPv4 into an IPv4-mapped 16-byte address", function()
        local b, v4 = P.parse_ip("10.1.2.3")
        assert.is_true(v4)
        assert.are.same({ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 1, 2, 3 }, b)
    end)

    it("parses IPv6 with ::, full form, upper case and an embedded IPv4 tail", function()
        assert.are.same({ 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
            (P.parse_ip("2001:db8::1")))
        assert.are.same(P.parse_ip("2001:db8::1"), P.parse_ip("2001:0DB8:0:0:0:0:0:0001"))
        assert.are.same(P.parse_ip("::ffff:10.1.2.3"), P.parse_ip("10.1.2.3"))
        assert.are.same({ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }, (P.parse_ip("::")))
        assert.are.same({ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 }, (P.parse_ip("::1")))
    end)

    it("rejects malformed addresses", function()
        for _, s in ipairs({ "", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-1",
            "a.b.c.d", "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1::2::3", ":::1", "12345::1",
            "fe80::1%eth0", "::g", "1.2.3.4::", "x" }) do
            assert.is_nil((P.parse_ip(s)), s)
        end
        assert.is_nil(P.parse_ip(nil))
    end)
end)

describe("ip-restriction CIDR matching", function()
    it("matches IPv4 networks at their edges", function()
        assert.is_true(inside("10.0.0.0/8", "10.255.255.255"))
        assert.is_false(inside("10.0.0.0/8", "11.0.0.0"))
        assert.is_true(inside("192.168.1.0/25", "192.168.1.127"))
        assert.is_false(inside("192.168.1.0/25", "192.168.1.128"))
        assert.is_true(inside("172.16.0.0/12", "172.31.0.1"))
        assert.is_false(inside("172.16.0.0/12", "172.32.0.1"))
    end)

    it("treats /0 as everything of its family and /32 or a bare address as one host", function()
        assert.is_true(inside("0.0.0.0/0", "203.0.113.7"))
        assert.is_false(inside("0.0.0.0/0", "2001:db8::1"))
        assert.is_true(inside("203.0.113.7/32", "203.0.113.7"))
        assert.is_false(inside("203.0.113.7/32", "203.0.113.6"))
        assert.is_true(inside("203.0.113.7", "203.0.113.7"))
    end)

    it("matches IPv6 networks, /0 and /128", function()
        assert.is_true(inside("2001:db8::/32", "2001:db8:ffff::1"))
        assert.is_false(inside("2001:db8::/32", "2001:db9::"))
        assert.is_true(inside("2001:db8::/33", "2001:db8:7fff::"))
        assert.is_false(inside("2001:db8::/33", "2001:db8:8000::"))
        assert.is_true(inside("::/0", "2001:db8::1"))
        assert.is_true(inside("::/0", "10.0.0.1"))
        assert.is_true(inside("::1/128", "::1"))
        assert.is_false(inside("::1/128", "::2"))
        assert.is_true(inside("fe80::/10", "febf::1"))
        assert.is_false(inside("fe80::/10", "fec0::1"))
    end)

    it("matches IPv4 networks against IPv4-mapped IPv6 clients and back", function()
        assert.is_true(inside("10.0.0.0/8", "::ffff:10.9.8.7"))
        assert.is_true(inside("::ffff:10.0.0.0/104", "10.9.8.7"))
        assert.is_false(inside("10.0.0.0/8", "::10.9.8.7"))
    end)

    it("ignores host bits in the network address", function()
        assert.is_true(inside("10.1.2.3/8", "10.200.0.1"))
    end)
end)

describe("ip-restriction decisions", function()
    it("lets through only the allow list", function()
        local c = conf({ allow = { "10.0.0.0/8", "2001:db8::/32" } })
        assert.is_true(P.allowed(c, "10.1.1.1"))
        assert.is_true(P.allowed(c, "2001:db8::9"))
        assert.is_false(P.allowed(c, "192.0.2.1"))
    end)

    it("lets deny win over allow", function()
        local c = conf({ allow = { "10.0.0.0/8" }, deny = { "10.6.0.0/16" } })
        assert.is_true(P.allowed(c, "10.5.0.1"))
        assert.is_false(P.allowed(c, "10.6.0.1"))
    end)

    it("refuses only the deny list when there is no allow list", function()
        local c = conf({ deny = { "::1", "127.0.0.1" } })
        assert.is_false(P.allowed(c, "::1"))
        assert.is_false(P.allowed(c, "127.0.0.1"))
        assert.is_true(P.allowed(c, "127.0.0.2"))
    end)

    it("refuses a client address it cannot parse (fail closed)", function()
        assert.is_false(P.allowed(conf({ deny = { "10.0.0.0/8" } }), "unix:"))
    end)

    it("defaults to 403 forbidden", function()
        local c = conf({ allow = { "10.0.0.0/8" } })
        assert.are.equal(403, c.status)
        assert.are.equal("forbidden", c.message)
    end)
end)

describe("ip-restriction config check", function()
    it("refuses invalid addresses and prefix lengths", function()
        refused({ allow = { "10.0.0.0/33" } }, "prefix length over 32")
        refused({ allow = { "::/129" } }, "prefix length over 128")
        refused({ deny = { "10.0.0.0/" } }, "invalid prefix length")
        refused({ deny = { "10.0.0.0/-1" } }, "invalid prefix length")
        refused({ allow = { "10.0.0/8" } }, "invalid address")
        refused({ allow = { "example.com" } }, "invalid address")
        refused({ allow = { "2001:db8::/32", "1::2::3/64" } }, "allow: invalid address")
    end)

    it("needs allow or deny", function()
        refused({}, "needs allow or deny")
    end)
end)
