"""Routing: precedence, params, wildcard, methods, hosts, strip_prefix,
rewrite, and path normalization (what is routed is what is proxied)."""

from harness import Client, assert_gateway_error, proxied, request, route, upstream_saw


def served_by(gw, up, path, method="GET", host="localhost"):
    """Index of the upstream port that answered, or the status if not 200."""
    r = request(gw.port, method, path, host=host)
    if r.status != 200:
        return r.status
    return up.ports.index(r.json()["port"])


def test_most_specific_route_wins_regardless_of_declaration_order():
    # Declared least specific first: the order must not matter.
    routes = [route("/*", "u0"), route("/users/*", "u1"), route("/users/{id}", "u2"),
              route("/users/me", "u3")]
    with proxied(routes, ports=4) as (gw, up):
        cases = {"/users/me": 3, "/users/42": 2, "/users/42/orders": 1, "/users": 1,
                 "/users/": 1, "/other": 0, "/usersX": 0, "/": 0, "/users/me/x": 1}
        got = {p: served_by(gw, up, p) for p in cases}
        assert got == cases, got


def test_most_specific_route_wins_when_declared_most_specific_first():
    routes = [route("/users/me", "u3"), route("/users/{id}", "u2"), route("/users/*", "u1"),
              route("/*", "u0")]
    with proxied(routes, ports=4) as (gw, up):
        cases = {"/users/me": 3, "/users/42": 2, "/users/42/orders": 1, "/x/y": 0}
        got = {p: served_by(gw, up, p) for p in cases}
        assert got == cases, got


def test_literal_segment_beats_parameter_at_the_first_difference():
    routes = [route("/a/{x}/c", "u0"), route("/a/b/{y}", "u1"), route("/a/*", "u2")]
    with proxied(routes, ports=3) as (gw, up):
        cases = {"/a/b/c": 1, "/a/z/c": 0, "/a/b/z": 1, "/a/z/z": 2, "/a/b/c/d": 2}
        got = {p: served_by(gw, up, p) for p in cases}
        assert got == cases, got


def test_route_with_a_method_condition_beats_the_same_pattern_without():
    routes = [route("/items", "u0"), route("/items", "u1", methods=["POST", "PUT"])]
    with proxied(routes, ports=2) as (gw, up):
        assert served_by(gw, up, "/items", "GET") == 0
        assert served_by(gw, up, "/items", "POST") == 1
        assert served_by(gw, up, "/items", "PUT") == 1
        assert served_by(gw, up, "/items", "DELETE") == 0


def test_route_limited_to_methods_does_not_match_other_methods():
    with proxied([route("/only-post", methods=["POST"])]) as (gw, up):
        r = request(gw.port, "GET", "/only-post")
        assert_gateway_error(r, 404)
        assert request(gw.port, "POST", "/only-post", body=b"x").status == 200
        assert up.stats()["requests"] == 1


def test_route_with_a_host_condition_matches_its_host_only():
    routes = [route("/h", "u0"), route("/h", "u1", hosts=["a.example.com"])]
    with proxied(routes, ports=2) as (gw, up):
        assert served_by(gw, up, "/h", host="a.example.com") == 1
        assert served_by(gw, up, "/h", host="A.Example.COM:8080") == 1
        assert served_by(gw, up, "/h", host="b.example.com") == 0
        assert served_by(gw, up, "/h", host="localhost") == 0


def test_route_with_only_a_host_condition_gives_404_for_other_hosts():
    with proxied([route("/api/*", hosts=["api.example.com"])]) as (gw, up):
        assert request(gw.port, "GET", "/api/x", host="api.example.com").status == 200
        assert_gateway_error(request(gw.port, "GET", "/api/x", host="evil.example.com"), 404)


def test_parameter_matches_exactly_one_non_empty_segment():
    with proxied([route("/users/{id}")]) as (gw, up):
        assert upstream_saw(request(gw.port, "GET", "/users/7"))["path"] == "/users/7"
        for p in ("/users/7/8", "/users", "/users/"):
            assert_gateway_error(request(gw.port, "GET", p), 404)
        assert up.stats()["requests"] == 1


def test_wildcard_matches_its_base_its_slash_and_below_but_not_a_longer_name():
    with proxied([route("/files/*")]) as (gw, up):
        for p in ("/files", "/files/", "/files/a", "/files/a/b/c.txt"):
            assert upstream_saw(request(gw.port, "GET", p))["path"] == p
        assert_gateway_error(request(gw.port, "GET", "/filesX"), 404)
        assert_gateway_error(request(gw.port, "GET", "/file"), 404)


def test_exact_route_matches_only_its_path():
    with proxied([route("/exact")]) as (gw, up):
        assert request(gw.port, "GET", "/exact").status == 200
        assert request(gw.port, "GET", "/exact?q=1").status == 200
        assert_gateway_error(request(gw.port, "GET", "/exact/more"), 404)
        assert_gateway_error(request(gw.port, "GET", "/exac"), 404)


def test_root_route_matches_only_the_root():
    with proxied([route("/")]) as (gw, up):
        assert request(gw.port, "GET", "/").status == 200
        assert_gateway_error(request(gw.port, "GET", "/x"), 404)


def test_strip_prefix_removes_the_literal_prefix_and_keeps_the_query():
    with proxied([route("/api/*", strip_prefix="/api")]) as (gw, up):
        cases = {"/api/users/1?x=1&y=%2F": "/users/1?x=1&y=%2F", "/api": "/",
                 "/api/": "/", "/api?q=1": "/?q=1", "/api/a/b/": "/a/b/"}
        for src, want in cases.items():
            assert upstream_saw(request(gw.port, "GET", src))["path"] == want, (src, want)


def test_rewrite_substitutes_parameters_and_the_wildcard_tail():
    routes = [route("/users/{id}", rewrite="/v1/accounts/{id}"),
              route("/static/*", rewrite="/assets{*}"),
              route("/orgs/{org}/repos/{repo}", rewrite="/r/{repo}/o/{org}")]
    with proxied(routes) as (gw, up):
        cases = {"/users/7?q=1": "/v1/accounts/7?q=1",
                 "/static/css/a.css": "/assets/css/a.css",
                 "/orgs/acme/repos/rocket": "/r/rocket/o/acme"}
        for src, want in cases.items():
            assert upstream_saw(request(gw.port, "GET", src))["path"] == want, (src, want)


# ---------------------------------------------------------------- normalization


def normalization_routes():
    return [route("/users/*", "u0"), route("/admin", "u1"), route("/public/*", "u2")]


def test_dot_dot_segment_is_resolved_before_routing():
    with proxied(normalization_routes(), ports=3) as (gw, up):
        r = request(gw.port, "GET", "/users/../admin")
        d = upstream_saw(r)
        assert (d["port"], d["path"]) == (up.ports[1], "/admin"), d
        assert up.stats()["ports"].get(str(up.ports[0]), 0) == 0


def test_dot_dot_to_a_path_without_route_is_404_and_reaches_nothing():
    with proxied([route("/users/*")]) as (gw, up):
        for p in ("/users/../admin", "/users/%2e%2e/admin", "/users/1/../../admin"):
            assert_gateway_error(request(gw.port, "GET", p), 404)
        assert up.stats()["requests"] == 0


def test_percent_encoded_dot_segments_are_resolved():
    with proxied(normalization_routes(), ports=3) as (gw, up):
        for p in ("/users/%2e%2e/admin", "/users/%2E%2E/admin", "/users/.%2e/admin",
                  "/public/x/%2e%2e/%2E%2e/admin", "/users/%2e/../admin"):
            d = upstream_saw(request(gw.port, "GET", p))
            assert (d["port"], d["path"]) == (up.ports[1], "/admin"), (p, d["path"])
        assert up.stats()["ports"].get(str(up.ports[0]), 0) == 0


def test_duplicate_slashes_are_collapsed_before_routing_and_proxying():
    with proxied(normalization_routes(), ports=3) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "//users//1///x?y=//z"))
        assert (d["port"], d["path"]) == (up.ports[0], "/users/1/x?y=//z"), d
        d = upstream_saw(request(gw.port, "GET", "//admin"))
        assert (d["port"], d["path"]) == (up.ports[1], "/admin"), d


def test_single_dot_segments_and_trailing_dot_dot_are_removed():
    with proxied([route("/users/*")]) as (gw, up):
        cases = {"/users/./1": "/users/1", "/users/1/.": "/users/1/",
                 "/users/1/..": "/users/", "/./users/1": "/users/1"}
        for src, want in cases.items():
            assert upstream_saw(request(gw.port, "GET", src))["path"] == want, (src, want)


def test_unreserved_escapes_are_decoded_and_others_kept_upper_cased():
    with proxied([route("/users/*")]) as (gw, up):
        cases = {"/users/%41%62c": "/users/Abc", "/users/%7euser": "/users/~user",
                 "/users/a%2Db%5fc%2E": "/users/a-b_c.",
                 "/users/a%3ab": "/users/a%3Ab", "/users/a%20b": "/users/a%20b",
                 "/%75sers/1": "/users/1"}
        for src, want in cases.items():
            assert upstream_saw(request(gw.port, "GET", src))["path"] == want, (src, want)


def test_unnormalizable_paths_are_refused_with_400_and_reach_nothing():
    bad = ["/users/a%2Fb", "/users/a%2fb", "/users/a%5Cb", "/users/a%5cb", "/users/a%00b",
           "/users/a\\b", "/users/%zz", "/users/%4", "/users/%", "/users/%g1",
           "/../users/1", "/users/../../x", "/%2e%2e/users/1", "/users/1/../../..",
           "/..", "/users/%2e%2e/%2e%2e/%2e%2e/etc/passwd"]
    with proxied([route("/*")]) as (gw, up):
        for p in bad:
            with Client(gw.port) as c:
                r = c.request("GET", p)
                assert_gateway_error(r, 400)
                assert c.wait_closed(3), "connection left open after a 400 for %r" % p
        st = up.stats()
        assert st["requests"] == 0, st


def test_encoded_slash_in_the_query_is_not_a_path_error():
    with proxied([route("/users/*")]) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/users/1?next=%2F..%2F%5C%00"))
        assert d["path"] == "/users/1?next=%2F..%2F%5C%00"


def test_normalized_path_is_what_strip_prefix_and_rewrite_see():
    routes = [route("/api/*", "u0", strip_prefix="/api"),
              route("/users/{id}", "u1", rewrite="/v1/u/{id}")]
    with proxied(routes, ports=2) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/api//x/./y/../z"))
        assert (d["port"], d["path"]) == (up.ports[0], "/x/z"), d
        d = upstream_saw(request(gw.port, "GET", "/users/%41"))
        assert (d["port"], d["path"]) == (up.ports[1], "/v1/u/A"), d
