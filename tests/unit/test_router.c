/*
 * Unit tests for core/router.c: matching of each pattern kind, precedence
 * (checked to be independent of declaration order), methods and hosts,
 * refusal of invalid patterns and ambiguous pairs, and 10,000-route tables.
 * Route `data` is a label string so a match can be checked with CHECK_STR.
 * Run under ASan with detect_leaks=1 to cover mg_router_free, including the
 * cleanup after a failed mg_router_new.
 */
#include "router.h"
#include "unit.h"

#include <llhttp.h>
#include <stdint.h>
#include <stdlib.h>

#define M(m) (1ull << HTTP_##m)

/* A route with no conditions, with methods, with methods and hosts. */
#define R(pat, label)                                                          \
    {                                                                          \
        MG_STR(pat), 0, NULL, 0, (void *)(label)                               \
    }
#define RM(pat, methods, label)                                                \
    {                                                                          \
        MG_STR(pat), methods, NULL, 0, (void *)(label)                         \
    }
#define RH(pat, methods, hosts, label)                                         \
    {                                                                          \
        MG_STR(pat), methods, hosts, MG_ARRAY_SIZE(hosts), (void *)(label)     \
    }

static char errbuf[512];

/* Builds a router that must compile; prints the reason if it does not. */
static mg_router_t *build(const mg_route_spec_t *specs, size_t n)
{
    mg_router_t *r = NULL;
    int rc = mg_router_new(specs, n, &r, errbuf, sizeof(errbuf));
    if (rc != 0)
        fprintf(stderr, "  mg_router_new: %d: %s\n", rc, errbuf);
    return r;
}

/* Builds the specs in reverse declaration order. */
static mg_router_t *build_reversed(const mg_route_spec_t *specs, size_t n)
{
    mg_route_spec_t *rev = malloc(n * sizeof(*rev));
    for (size_t i = 0; i < n; i++)
        rev[i] = specs[n - 1 - i];
    mg_router_t *r = build(rev, n);
    free(rev);
    return r;
}

/* The label of the matched route, or NULL on MG_DECLINED. */
static const char *match(const mg_router_t *r, unsigned method,
                         const char *host, const char *path,
                         mg_route_match_t *m)
{
    mg_route_match_t local;
    if (!m)
        m = &local;
    int rc = mg_router_match(r, method, mg_str_from_cstr(host),
                             mg_str_from_cstr(path), m);
    if (rc == MG_DECLINED)
        return m->data == NULL ? NULL : "declined-with-data";
    return rc == 0 ? m->data : "bad-rc";
}

static const char *get(const mg_router_t *r, const char *path)
{
    return match(r, HTTP_GET, "example.com", path, NULL);
}

/* Builds the specs with an expected MG_ECONFIG; the reason is in errbuf. */
static int build_fails(const mg_route_spec_t *specs, size_t n)
{
    mg_router_t *r = (mg_router_t *)1;
    errbuf[0] = 'x';
    errbuf[1] = '\0';
    int rc = mg_router_new(specs, n, &r, errbuf, sizeof(errbuf));
    if (rc == 0)
        mg_router_free(r);
    return rc == MG_ECONFIG && r == NULL;
}

static void test_exact_routes_match_only_their_path(void)
{
    mg_route_spec_t specs[] = {R("/users", "users"), R("/users/me", "me"),
                               R("/a/b/c", "abc")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/users/me", &m), "me");
    CHECK_INT(m.nparams, ==, 0);
    CHECK(m.wildcard.p == NULL && m.wildcard.len == 0);
    CHECK_STR(get(r, "/users"), "users");
    CHECK_STR(get(r, "/a/b/c"), "abc");
    CHECK(get(r, "/a/b") == NULL);
    CHECK(get(r, "/a") == NULL);
    CHECK(get(r, "/a/b/c/d") == NULL);
    CHECK(get(r, "/user") == NULL);
    CHECK(get(r, "/usersme") == NULL);
    CHECK(get(r, "/") == NULL);
    mg_router_free(r);
}

static void test_root_pattern_matches_only_root(void)
{
    mg_route_spec_t specs[] = {R("/", "root"), R("/a", "a")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK_STR(get(r, "/"), "root");
    CHECK_STR(get(r, "/a"), "a");
    CHECK(get(r, "/b") == NULL);
    CHECK(get(r, "/a/") == NULL);
    mg_router_free(r);
}

static void test_trailing_slash_is_significant(void)
{
    mg_route_spec_t specs[] = {R("/users/me", "no-slash"), R("/docs/", "slash"),
                               R("/items/{id}/", "param-slash")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(get(r, "/users/me"), "no-slash");
    CHECK(get(r, "/users/me/") == NULL);
    CHECK_STR(get(r, "/docs/"), "slash");
    CHECK(get(r, "/docs") == NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/items/7/", &m), "param-slash");
    CHECK_MGSTR(m.param_values[0], "7");
    CHECK(get(r, "/items/7") == NULL);
    mg_router_free(r);
}

static void test_params_are_extracted_in_pattern_order(void)
{
    mg_route_spec_t specs[] = {
        R("/users/{id}", "user"),
        R("/orgs/{org}/repos/{repo}/issues/{n}", "issue"),
    };
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);

    CHECK_STR(match(r, HTTP_GET, "", "/users/42", &m), "user");
    CHECK_INT(m.nparams, ==, 1);
    CHECK_MGSTR(m.param_names[0], "id");
    CHECK_MGSTR(m.param_values[0], "42");

    const char *path = "/orgs/moon/repos/gate/issues/7";
    CHECK_STR(match(r, HTTP_GET, "", path, &m), "issue");
    CHECK_INT(m.nparams, ==, 3);
    CHECK_MGSTR(m.param_names[0], "org");
    CHECK_MGSTR(m.param_values[0], "moon");
    CHECK_MGSTR(m.param_names[1], "repo");
    CHECK_MGSTR(m.param_values[1], "gate");
    CHECK_MGSTR(m.param_names[2], "n");
    CHECK_MGSTR(m.param_values[2], "7");
    /* values borrow the request path */
    CHECK(m.param_values[0].p == path + 6);
    CHECK(m.wildcard.p == NULL);
    mg_router_free(r);
}

static void test_param_values_keep_escapes(void)
{
    mg_route_spec_t specs[] = {R("/files/{name}", "file")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/files/a%20b.txt", &m), "file");
    CHECK_MGSTR(m.param_values[0], "a%20b.txt");
    mg_router_free(r);
}

static void test_param_never_matches_empty_segment(void)
{
    mg_route_spec_t specs[] = {R("/users/{id}", "user"), R("/{x}", "top")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK(get(r, "/users/") == NULL);
    CHECK(get(r, "/") == NULL);
    CHECK_STR(get(r, "/users"), "top");
    CHECK(get(r, "/users/1/2") == NULL);
    mg_router_free(r);
}

static void test_param_names_belong_to_each_route(void)
{
    /* One shape, disjoint methods: each route reports its own names. */
    mg_route_spec_t specs[] = {RM("/u/{a}", M(GET), "get"),
                               RM("/u/{b}", M(POST), "post")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/u/1", &m), "get");
    CHECK_MGSTR(m.param_names[0], "a");
    CHECK_STR(match(r, HTTP_POST, "", "/u/2", &m), "post");
    CHECK_MGSTR(m.param_names[0], "b");
    CHECK_MGSTR(m.param_values[0], "2");
    mg_router_free(r);
}

static void test_wildcard_captures_the_rest(void)
{
    mg_route_spec_t specs[] = {R("/users/*", "users")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);

    const char *p = "/users";
    CHECK_STR(match(r, HTTP_GET, "", p, &m), "users");
    CHECK_MGSTR(m.wildcard, "");
    CHECK(m.wildcard.p == p + 6); /* empty, but inside the path */
    CHECK_STR(match(r, HTTP_GET, "", "/users/", &m), "users");
    CHECK_MGSTR(m.wildcard, "/");
    CHECK_STR(match(r, HTTP_GET, "", "/users/x", &m), "users");
    CHECK_MGSTR(m.wildcard, "/x");
    CHECK_STR(match(r, HTTP_GET, "", "/users/x/y/", &m), "users");
    CHECK_MGSTR(m.wildcard, "/x/y/");
    CHECK_INT(m.nparams, ==, 0);
    CHECK(get(r, "/usersX") == NULL);
    CHECK(get(r, "/user") == NULL);
    CHECK(get(r, "/") == NULL);
    mg_router_free(r);
}

static void test_root_wildcard_matches_everything(void)
{
    mg_route_spec_t specs[] = {R("/*", "all")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/", &m), "all");
    CHECK_MGSTR(m.wildcard, "/");
    CHECK_STR(match(r, HTTP_GET, "", "/a", &m), "all");
    CHECK_MGSTR(m.wildcard, "/a");
    CHECK_STR(match(r, HTTP_DELETE, "x", "/a/b/c/", &m), "all");
    CHECK_MGSTR(m.wildcard, "/a/b/c/");
    mg_router_free(r);
}

static void test_wildcard_after_params(void)
{
    mg_route_spec_t specs[] = {R("/repos/{owner}/{repo}/*", "tree")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/repos/a/b/src/main.c", &m), "tree");
    CHECK_INT(m.nparams, ==, 2);
    CHECK_MGSTR(m.param_values[0], "a");
    CHECK_MGSTR(m.param_values[1], "b");
    CHECK_MGSTR(m.wildcard, "/src/main.c");
    CHECK_STR(match(r, HTTP_GET, "", "/repos/a/b", &m), "tree");
    CHECK_MGSTR(m.wildcard, "");
    CHECK(get(r, "/repos/a") == NULL);
    mg_router_free(r);
}

/* The precedence table, used in both declaration orders. */
static const mg_route_spec_t precedence_specs[] = {
    R("/*", "root-wild"),
    R("/users/*", "users-wild"),
    R("/users/{id}", "user-param"),
    R("/users/me", "me"),
    R("/users/{id}/posts", "posts-param"),
    R("/users/me/posts", "posts-me"),
    R("/users/{id}/*", "user-wild"),
    R("/users", "users"),
    R("/{section}/about", "about"),
};

static const struct {
    const char *path, *want;
} precedence_cases[] = {
    {"/users/me", "me"},
    {"/users/5", "user-param"},
    {"/users", "users"},
    {"/users/", "users-wild"},
    {"/users/5/x", "user-wild"},
    {"/users/me/x", "user-wild"},
    {"/users/me/posts", "posts-me"},
    {"/users/9/posts", "posts-param"},
    {"/users/9/posts/1", "user-wild"},
    {"/users/about", "user-param"},
    {"/team/about", "about"},
    {"/team/x", "root-wild"},
    {"/", "root-wild"},
    {"/usersX", "root-wild"},
};

static void check_precedence(const mg_router_t *r)
{
    for (size_t i = 0; i < MG_ARRAY_SIZE(precedence_cases); i++) {
        const char *got = get(r, precedence_cases[i].path);
        if (!got || strcmp(got, precedence_cases[i].want) != 0)
            FAIL_AT("%s: want %s, got %s", precedence_cases[i].path,
                    precedence_cases[i].want, got ? got : "(declined)");
    }
}

static void test_precedence_exact_param_wildcard(void)
{
    mg_router_t *r = build(precedence_specs, MG_ARRAY_SIZE(precedence_specs));
    CHECK(r != NULL);
    check_precedence(r);
    mg_router_free(r);
    CHECK(!unit_current_failed);
}

static void test_precedence_ignores_declaration_order(void)
{
    size_t n = MG_ARRAY_SIZE(precedence_specs);
    mg_router_t *r = build_reversed(precedence_specs, n);
    CHECK(r != NULL);
    check_precedence(r);
    mg_router_free(r);
    CHECK(!unit_current_failed);

    /* and a few rotations */
    mg_route_spec_t rot[MG_ARRAY_SIZE(precedence_specs)];
    for (size_t k = 1; k < n; k++) {
        for (size_t i = 0; i < n; i++)
            rot[i] = precedence_specs[(i + k) % n];
        r = build(rot, n);
        CHECK(r != NULL);
        check_precedence(r);
        mg_router_free(r);
        CHECK(!unit_current_failed);
    }
}

static void test_longer_wildcard_beats_shorter(void)
{
    mg_route_spec_t specs[] = {R("/*", "root"), R("/a/*", "a"),
                               R("/a/b/*", "ab")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/a/b/c", &m), "ab");
    CHECK_MGSTR(m.wildcard, "/c");
    CHECK_STR(match(r, HTTP_GET, "", "/a/b", &m), "ab");
    CHECK_STR(match(r, HTTP_GET, "", "/a/c", &m), "a");
    CHECK_MGSTR(m.wildcard, "/c");
    CHECK_STR(match(r, HTTP_GET, "", "/b", &m), "root");
    mg_router_free(r);
}

static void test_backtracks_to_param_when_literal_subtree_fails(void)
{
    mg_route_spec_t specs[] = {R("/a/b/c", "abc"), R("/a/{x}/d", "axd"),
                               R("/{y}/b/e", "ybe")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/a/b/d", &m), "axd");
    CHECK_INT(m.nparams, ==, 1);
    CHECK_MGSTR(m.param_names[0], "x");
    CHECK_MGSTR(m.param_values[0], "b");
    /* two levels of backtracking; the failed branch's value is dropped */
    CHECK_STR(match(r, HTTP_GET, "", "/a/b/e", &m), "ybe");
    CHECK_INT(m.nparams, ==, 1);
    CHECK_MGSTR(m.param_names[0], "y");
    CHECK_MGSTR(m.param_values[0], "a");
    CHECK(get(r, "/a/b/f") == NULL);
    mg_router_free(r);
}

static void test_methods_filter_routes(void)
{
    mg_route_spec_t specs[] = {
        RM("/items", M(GET) | M(HEAD), "read"),
        RM("/items", M(POST), "create"),
        RM("/items/{id}", M(DELETE), "delete"),
    };
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", "/items", NULL), "read");
    CHECK_STR(match(r, HTTP_HEAD, "", "/items", NULL), "read");
    CHECK_STR(match(r, HTTP_POST, "", "/items", NULL), "create");
    CHECK(match(r, HTTP_PUT, "", "/items", NULL) == NULL);
    CHECK_STR(match(r, HTTP_DELETE, "", "/items/3", NULL), "delete");
    CHECK(match(r, HTTP_GET, "", "/items/3", NULL) == NULL);
    mg_router_free(r);
}

static void test_refused_method_falls_through_to_less_specific(void)
{
    mg_route_spec_t specs[] = {
        RM("/users/me", M(POST), "me-post"), R("/users/{id}", "user"),
        RM("/users/{id}/x", M(PUT), "x-put"), R("/users/*", "wild")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_POST, "", "/users/me", &m), "me-post");
    CHECK_STR(match(r, HTTP_GET, "", "/users/me", &m), "user");
    CHECK_MGSTR(m.param_values[0], "me");
    CHECK_STR(match(r, HTTP_PUT, "", "/users/1/x", &m), "x-put");
    CHECK_STR(match(r, HTTP_GET, "", "/users/1/x", &m), "wild");
    CHECK_INT(m.nparams, ==, 0); /* the {id} value was dropped */
    CHECK_MGSTR(m.wildcard, "/1/x");
    mg_router_free(r);
}

static void test_method_numbers_out_of_mask_range(void)
{
    mg_route_spec_t specs[] = {RM("/m", M(GET), "get"), R("/any", "any")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK(match(r, 64, "", "/m", NULL) == NULL);
    CHECK(match(r, 1000, "", "/m", NULL) == NULL);
    CHECK_STR(match(r, 64, "", "/any", NULL), "any");
    mg_router_free(r);
}

static const mg_str_t hosts_a[] = {MG_STR("a.example.com")};
static const mg_str_t hosts_ab[] = {MG_STR("A.Example.com"),
                                    MG_STR("b.example.com")};
static const mg_str_t hosts_wild[] = {MG_STR("*.example.com")};
static const mg_str_t hosts_v6[] = {MG_STR("[::1]")};
static const mg_str_t hosts_org[] = {MG_STR("example.org")};

/*
 * One pattern, routes with 2, 2, 1 and 0 conditions. (A methods-only and a
 * hosts-only route could not share it: both would take, say, POST to
 * a.example.com with one condition each, which is ambiguous.)
 */
static const mg_route_spec_t condition_specs[] = {
    R("/p", "none"),
    RM("/p", M(POST), "post"),
    RH("/p", M(GET), hosts_a, "get-host-a"),
    RH("/p", M(POST), hosts_a, "post-host-a"),
};

static void check_conditions(const mg_router_t *r)
{
    CHECK_STR(match(r, HTTP_POST, "a.example.com", "/p", NULL), "post-host-a");
    CHECK_STR(match(r, HTTP_GET, "a.example.com", "/p", NULL), "get-host-a");
    CHECK_STR(match(r, HTTP_POST, "b.example.com", "/p", NULL), "post");
    CHECK_STR(match(r, HTTP_GET, "b.example.com", "/p", NULL), "none");
    CHECK_STR(match(r, HTTP_PUT, "a.example.com", "/p", NULL), "none");
    CHECK_STR(match(r, HTTP_GET, "", "/p", NULL), "none");
}

static void test_more_conditions_are_tried_first(void)
{
    size_t n = MG_ARRAY_SIZE(condition_specs);
    mg_router_t *r = build(condition_specs, n);
    CHECK(r != NULL);
    check_conditions(r);
    mg_router_free(r);
    CHECK(!unit_current_failed);
    r = build_reversed(condition_specs, n);
    CHECK(r != NULL);
    check_conditions(r);
    mg_router_free(r);
}

static void test_hosts_exact_and_case_insensitive(void)
{
    mg_route_spec_t specs[] = {RH("/h", 0, hosts_ab, "ab"),
                               RH("/h", 0, hosts_org, "org")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "a.example.com", "/h", NULL), "ab");
    CHECK_STR(match(r, HTTP_GET, "A.EXAMPLE.COM", "/h", NULL), "ab");
    CHECK_STR(match(r, HTTP_GET, "b.Example.Com", "/h", NULL), "ab");
    CHECK_STR(match(r, HTTP_GET, "EXAMPLE.org", "/h", NULL), "org");
    CHECK(match(r, HTTP_GET, "c.example.com", "/h", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "a.example.comx", "/h", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "xa.example.com", "/h", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "", "/h", NULL) == NULL);
    mg_router_free(r);
}

static void test_hosts_ignore_port_and_trailing_dot(void)
{
    mg_route_spec_t specs[] = {RH("/h", 0, hosts_a, "a"),
                               RH("/v6", 0, hosts_v6, "v6")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "a.example.com:8080", "/h", NULL), "a");
    CHECK_STR(match(r, HTTP_GET, "a.example.com:", "/h", NULL), "a");
    CHECK_STR(match(r, HTTP_GET, "a.example.com.", "/h", NULL), "a");
    CHECK_STR(match(r, HTTP_GET, "a.example.com.:443", "/h", NULL), "a");
    CHECK(match(r, HTTP_GET, "a.example.com..", "/h", NULL) == NULL);
    CHECK_STR(match(r, HTTP_GET, "[::1]", "/v6", NULL), "v6");
    CHECK_STR(match(r, HTTP_GET, "[::1]:8080", "/v6", NULL), "v6");
    CHECK(match(r, HTTP_GET, "[::2]:8080", "/v6", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "[::1", "/v6", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "::1", "/v6", NULL) == NULL);
    mg_router_free(r);
}

static void test_hosts_wildcard_needs_a_label(void)
{
    mg_route_spec_t specs[] = {RH("/w", 0, hosts_wild, "wild")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "a.example.com", "/w", NULL), "wild");
    CHECK_STR(match(r, HTTP_GET, "a.b.example.com", "/w", NULL), "wild");
    CHECK_STR(match(r, HTTP_GET, "A.EXAMPLE.COM:80", "/w", NULL), "wild");
    CHECK(match(r, HTTP_GET, "example.com", "/w", NULL) == NULL);
    CHECK(match(r, HTTP_GET, ".example.com", "/w", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "aexample.com", "/w", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "a.example.com.evil", "/w", NULL) == NULL);
    CHECK(match(r, HTTP_GET, "", "/w", NULL) == NULL);
    mg_router_free(r);
}

static void test_no_match_is_declined(void)
{
    mg_route_spec_t specs[] = {R("/a", "a")};
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs));
    mg_route_match_t m;
    CHECK(r != NULL);
    m.data = (void *)"stale";
    CHECK_INT(mg_router_match(r, HTTP_GET, MG_STR(""), MG_STR("/b"), &m), ==,
              MG_DECLINED);
    CHECK(m.data == NULL);
    CHECK_INT(m.nparams, ==, 0);
    CHECK_INT(mg_router_match(r, HTTP_GET, MG_STR(""), MG_STR(""), &m), ==,
              MG_DECLINED);
    CHECK_INT(mg_router_match(r, HTTP_GET, MG_STR(""), MG_STR("a"), &m), ==,
              MG_DECLINED);
    CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR, MG_NULL_STR, &m), ==,
              MG_DECLINED);
    mg_router_free(r);

    r = build(NULL, 0);
    CHECK(r != NULL);
    CHECK(get(r, "/") == NULL);
    CHECK(get(r, "/a") == NULL);
    mg_router_free(r);
}

static void test_invalid_patterns_are_refused(void)
{
    static const struct {
        const char *pattern, *reason;
    } bad[] = {
        {"", "must start with '/'"},
        {"users", "must start with '/'"},
        {"*", "must start with '/'"},
        {"/users//x", "empty segment"},
        {"//", "empty segment"},
        {"/a*", "'*' must be a whole segment"},
        {"/*a", "'*' must be a whole segment"},
        {"/**", "'*' must be a whole segment"},
        {"/*/a", "'*' must be the last segment"},
        {"/a/*/", "'*' must be the last segment"},
        {"/{id", "unbalanced '{'"},
        {"/{", "unbalanced '{'"},
        {"/{id}x", "unbalanced '{'"},
        {"/{}", "empty parameter name"},
        {"/id}", "may only enclose a whole segment"},
        {"/a{id}", "may only enclose a whole segment"},
        {"/{a}/{a}", "duplicate parameter name \"a\""},
        {"/{a b}", "invalid parameter name"},
        {"/{a{b}", "invalid parameter name"},
        {"/{a.b}", "invalid parameter name"},
        {"/a/./b", "not in normalized form"},
        {"/a/../b", "not in normalized form"},
        {"/a/.", "not in normalized form"},
        {"/%7euser", "not in normalized form"},
        {"/%3a", "normalized form, so no request could match it; write "
                 "\"/%3A\""},
        {"/a%2fb", "not a valid path"},
        {"/a b", "not a valid path"},
        {"/a\\b", "not a valid path"},
        {"/..", "not a valid path"},
        {"/%zz", "not a valid path"},
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(bad); i++) {
        mg_route_spec_t spec = {mg_str_from_cstr(bad[i].pattern), 0, NULL, 0,
                                NULL};
        char want[160];
        snprintf(want, sizeof(want), "route \"%s\": ", bad[i].pattern);
        if (!build_fails(&spec, 1))
            FAIL_AT("pattern \"%s\" was accepted", bad[i].pattern);
        if (strncmp(errbuf, want, strlen(want)) != 0
            || !strstr(errbuf, bad[i].reason))
            FAIL_AT("pattern \"%s\": message \"%s\" lacks \"%s\"",
                    bad[i].pattern, errbuf, bad[i].reason);
    }
}

static void test_param_count_limit(void)
{
    char pat[256], path[256];
    size_t pl = 0, ql = 0;
    for (int i = 0; i < MG_ROUTER_MAX_PARAMS; i++) {
        pl += (size_t)sprintf(pat + pl, "/{p%d}", i);
        ql += (size_t)sprintf(path + ql, "/v%d", i);
    }
    mg_route_spec_t spec = {{pat, pl}, 0, NULL, 0, (void *)"many"};
    mg_router_t *r = build(&spec, 1);
    mg_route_match_t m;
    CHECK(r != NULL);
    CHECK_STR(match(r, HTTP_GET, "", path, &m), "many");
    CHECK_INT(m.nparams, ==, MG_ROUTER_MAX_PARAMS);
    CHECK_MGSTR(m.param_names[15], "p15");
    CHECK_MGSTR(m.param_values[15], "v15");
    mg_router_free(r);

    pl += (size_t)sprintf(pat + pl, "/{p%d}", MG_ROUTER_MAX_PARAMS);
    spec.pattern.len = pl;
    CHECK(build_fails(&spec, 1));
    CHECK(strstr(errbuf, "more than 16 parameters") != NULL);
}

static void test_invalid_hosts_are_refused(void)
{
    static const char *const bad[] = {
        "",
        "*",
        "*.",
        "a.*.com",
        "**.example.com",
        "*example.com",
        "example.com:8080",
        "exa mple.com",
        "example.com.",
        "a/b",
        "[::1]:80",
        "[::1",
        "[]",
        "[::g]",
        "[::1]x",
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(bad); i++) {
        mg_str_t h[] = {MG_STR("ok.example.com"), mg_str_from_cstr(bad[i])};
        mg_route_spec_t spec = RH("/x", 0, h, "x");
        if (!build_fails(&spec, 1))
            FAIL_AT("host \"%s\" was accepted", bad[i]);
        if (!strstr(errbuf, "route \"/x\"")
            || !strstr(errbuf, bad[i][0] ? "invalid host" : "empty host"))
            FAIL_AT("host \"%s\": message \"%s\"", bad[i], errbuf);
    }
}

static const mg_str_t hosts_a_upper[] = {MG_STR("A.EXAMPLE.COM")};
static const mg_str_t hosts_sub_wild[] = {MG_STR("*.a.example.com")};
static const mg_str_t hosts_apex[] = {MG_STR("example.com")};

static void test_ambiguous_routes_are_refused(void)
{
    static const struct {
        mg_route_spec_t a, b;
    } pairs[] = {
        {R("/u/{a}", "1"), R("/u/{b}", "2")},
        {R("/same", "1"), R("/same", "2")},
        {R("/u/*", "1"), R("/u/*", "2")},
        {RM("/m", M(GET), "1"), RM("/m", M(GET) | M(POST), "2")},
        {RM("/m", M(GET), "1"), RH("/m", 0, hosts_a, "2")},
        {RH("/h", 0, hosts_a, "1"), RH("/h", 0, hosts_a_upper, "2")},
        {RH("/h", 0, hosts_ab, "1"), RH("/h", 0, hosts_a, "2")},
        {RH("/h", 0, hosts_wild, "1"), RH("/h", 0, hosts_a, "2")},
        {RH("/h", 0, hosts_wild, "1"), RH("/h", 0, hosts_sub_wild, "2")},
        {RH("/h", M(GET), hosts_a, "1"), RH("/h", M(GET), hosts_wild, "2")},
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(pairs); i++) {
        mg_route_spec_t specs[] = {pairs[i].a, pairs[i].b};
        char wa[64], wb[64];
        snprintf(wa, sizeof(wa), "\"%.*s\"", (int)specs[0].pattern.len,
                 specs[0].pattern.p);
        snprintf(wb, sizeof(wb), "\"%.*s\"", (int)specs[1].pattern.len,
                 specs[1].pattern.p);
        for (int order = 0; order < 2; order++) {
            if (order == 1) {
                specs[0] = pairs[i].b;
                specs[1] = pairs[i].a;
            }
            if (!build_fails(specs, 2))
                FAIL_AT("pair %zu (order %d) was accepted", i, order);
            if (!strstr(errbuf, "ambiguous") || !strstr(errbuf, wa)
                || !strstr(errbuf, wb))
                FAIL_AT("pair %zu: message \"%s\"", i, errbuf);
        }
    }
}

static void test_disjoint_or_ranked_routes_are_accepted(void)
{
    static const struct {
        mg_route_spec_t a, b;
    } pairs[] = {
        {RM("/m", M(GET), "1"), RM("/m", M(POST), "2")},
        {RM("/m", M(GET), "1"), R("/m", "2")},
        {RH("/h", 0, hosts_a, "1"), RH("/h", 0, hosts_org, "2")},
        {RH("/h", 0, hosts_wild, "1"), RH("/h", 0, hosts_apex, "2")},
        {RH("/h", M(GET), hosts_a, "1"), RH("/h", M(POST), hosts_a, "2")},
        {RH("/h", M(GET), hosts_a, "1"), RM("/h", M(GET), "2")},
        {R("/u/{a}", "1"), R("/u/{a}/", "2")},
        {R("/u/*", "1"), R("/u", "2")},
        {R("/u/{a}", "1"), R("/u/a", "2")},
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(pairs); i++) {
        mg_route_spec_t specs[] = {pairs[i].a, pairs[i].b};
        mg_router_t *r = build(specs, 2);
        if (!r)
            FAIL_AT("pair %zu refused: %s", i, errbuf);
        mg_router_free(r);
    }
}

static void test_error_message_fits_any_buffer(void)
{
    mg_route_spec_t specs[] = {R("/dup", "1"), R("/dup", "2")};
    mg_router_t *r = (mg_router_t *)1;
    char small[8];
    memset(small, 'x', sizeof(small));
    CHECK_INT(mg_router_new(specs, 2, &r, small, sizeof(small)), ==,
              MG_ECONFIG);
    CHECK(r == NULL);
    CHECK_STR(small, "routes ");

    CHECK_INT(mg_router_new(specs, 2, &r, NULL, 0), ==, MG_ECONFIG);
    mg_route_spec_t bad = R("nope", "x");
    CHECK_INT(mg_router_new(&bad, 1, &r, small, sizeof(small)), ==, MG_ECONFIG);
    CHECK_STR(small, "route \"");

    /* a long, binary pattern is quoted on one line and cut */
    char pat[400];
    memset(pat, 'a', sizeof(pat));
    pat[0] = 'x';
    pat[5] = '\n';
    bad.pattern = (mg_str_t){pat, sizeof(pat)};
    CHECK_INT(mg_router_new(&bad, 1, &r, errbuf, sizeof(errbuf)), ==,
              MG_ECONFIG);
    CHECK(strchr(errbuf, '\n') == NULL);
    CHECK(strstr(errbuf, "...\": pattern must start with '/'") != NULL);
}

static void test_router_keeps_its_own_copies(void)
{
    char pat[] = "/copy/{name}";
    char host[] = "copy.example.com";
    mg_str_t hosts[] = {{host, sizeof(host) - 1}};
    mg_route_spec_t spec = RH("", 0, hosts, "copy");
    spec.pattern = (mg_str_t){pat, sizeof(pat) - 1};
    mg_router_t *r = build(&spec, 1);
    mg_route_match_t m;
    CHECK(r != NULL);
    memset(pat, '#', sizeof(pat) - 1);
    memset(host, '#', sizeof(host) - 1);
    CHECK_STR(match(r, HTTP_GET, "copy.example.com", "/copy/x", &m), "copy");
    CHECK_MGSTR(m.param_names[0], "name");
    mg_router_free(r);
}

/* Four shapes per service: exact, param, wildcard, two params. */
static void test_ten_thousand_routes_match(void)
{
    enum { NSVC = 2500, N = NSVC * 4 };
    static const char *const fmt[4] = {"/svc%d/items", "/svc%d/items/{id}",
                                       "/svc%d/files/*",
                                       "/svc%d/items/{id}/tags/{tag}"};
    mg_route_spec_t *specs = calloc(N + 1, sizeof(*specs));
    char(*pats)[48] = calloc(N, sizeof(*pats));
    for (int i = 0; i < N; i++) {
        int len = snprintf(pats[i], sizeof(pats[i]), fmt[i % 4], i / 4);
        specs[i].pattern = (mg_str_t){pats[i], (size_t)len};
        specs[i].data = (void *)(uintptr_t)(i + 1);
    }
    specs[N] = (mg_route_spec_t)R("/*", NULL);
    mg_router_t *r = build(specs, N + 1);
    mg_router_t *rev = build_reversed(specs, N + 1);
    CHECK(r != NULL && rev != NULL);

    for (int s = 0; s < NSVC; s++) {
        char path[4][64];
        mg_route_match_t m, mr;
        snprintf(path[0], 64, "/svc%d/items", s);
        snprintf(path[1], 64, "/svc%d/items/%d", s, s * 7);
        snprintf(path[2], 64, "/svc%d/files/a/%d", s, s);
        snprintf(path[3], 64, "/svc%d/items/%d/tags/t%d", s, s, s);
        for (int k = 0; k < 4; k++) {
            mg_str_t p = mg_str_from_cstr(path[k]);
            CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR, p, &m), ==, 0);
            CHECK_INT(mg_router_match(rev, HTTP_GET, MG_NULL_STR, p, &mr), ==,
                      0);
            CHECK_INT((uintptr_t)m.data, ==, s * 4 + k + 1);
            CHECK(mr.data == m.data);
            CHECK_INT(m.nparams, ==, k == 3 ? 2 : k == 1 ? 1 : 0);
        }
        char want[32];
        snprintf(want, sizeof(want), "%d", s * 7);
        mg_str_t p = mg_str_from_cstr(path[1]);
        CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR, p, &m), ==, 0);
        CHECK_MGSTR(m.param_values[0], want);
        p = mg_str_from_cstr(path[2]);
        CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR, p, &m), ==, 0);
        snprintf(want, sizeof(want), "/a/%d", s);
        CHECK_MGSTR(m.wildcard, want);
    }
    /* unknown services and shapes fall back to "/\*" */
    mg_route_match_t m;
    CHECK_INT(
        mg_router_match(r, HTTP_GET, MG_NULL_STR, MG_STR("/svc2500/items"), &m),
        ==, 0);
    CHECK(m.data == NULL);
    CHECK_MGSTR(m.wildcard, "/svc2500/items");
    CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR,
                              MG_STR("/svc1/items/1/tags"), &m),
              ==, 0);
    CHECK(m.data == NULL);

    mg_router_free(r);
    mg_router_free(rev);
    free(specs);
    free(pats);
}

/* 10,000 literal siblings declared in a scrambled order. */
static void test_ten_thousand_siblings_in_any_order(void)
{
    enum { N = 10000 };
    mg_route_spec_t *specs = calloc(N, sizeof(*specs));
    char(*pats)[16] = calloc(N, sizeof(*pats));
    for (int i = 0; i < N; i++) {
        int k = (int)(((unsigned)i * 7919u) % N); /* 7919 is prime */
        int len = snprintf(pats[i], sizeof(pats[i]), "/k%d", k);
        specs[i].pattern = (mg_str_t){pats[i], (size_t)len};
        specs[i].data = (void *)(uintptr_t)(k + 1);
    }
    mg_router_t *r = build(specs, N);
    CHECK(r != NULL);
    for (int k = 0; k < N; k++) {
        char path[16];
        mg_route_match_t m;
        snprintf(path, sizeof(path), "/k%d", k);
        CHECK_INT(mg_router_match(r, HTTP_GET, MG_NULL_STR,
                                  mg_str_from_cstr(path), &m),
                  ==, 0);
        CHECK_INT((uintptr_t)m.data, ==, k + 1);
    }
    CHECK(get(r, "/k10000") == NULL);
    CHECK(get(r, "/k") == NULL);
    CHECK(get(r, "/k01") == NULL);
    mg_router_free(r);
    free(specs);
    free(pats);
}

/*
 * Exercises every allocation path (nodes, children arrays, lists, hosts)
 * and the cleanup after a failure in the middle of a build; ASan's leak
 * check at exit is the assertion.
 */
static void test_free_releases_everything(void)
{
    mg_route_spec_t specs[] = {
        R("/", "root"),
        R("/*", "all"),
        RH("/a/{b}/c/*", M(GET), hosts_ab, "x"),
        RH("/a/{b}/c/*", M(POST), hosts_wild, "y"),
        R("/a/{b}/c/d", "z"),
        R("/a/b/c", "w"),
        R("/a/b/c", "dup"), /* ambiguous: fails after 6 inserts */
    };
    mg_router_t *r = build(specs, MG_ARRAY_SIZE(specs) - 1);
    CHECK(r != NULL);
    mg_router_free(r);
    mg_router_free(NULL);
    CHECK(build_fails(specs, MG_ARRAY_SIZE(specs)));

    /* a bad host after a good one, on a later route */
    static const mg_str_t mixed[] = {MG_STR("ok.example.com"),
                                     MG_STR("bad host")};
    mg_route_spec_t bad[] = {R("/ok", "ok"), RH("/bad", 0, mixed, "b")};
    CHECK(build_fails(bad, 2));
}

int main(void)
{
    RUN(test_exact_routes_match_only_their_path);
    RUN(test_root_pattern_matches_only_root);
    RUN(test_trailing_slash_is_significant);
    RUN(test_params_are_extracted_in_pattern_order);
    RUN(test_param_values_keep_escapes);
    RUN(test_param_never_matches_empty_segment);
    RUN(test_param_names_belong_to_each_route);
    RUN(test_wildcard_captures_the_rest);
    RUN(test_root_wildcard_matches_everything);
    RUN(test_wildcard_after_params);
    RUN(test_precedence_exact_param_wildcard);
    RUN(test_precedence_ignores_declaration_order);
    RUN(test_longer_wildcard_beats_shorter);
    RUN(test_backtracks_to_param_when_literal_subtree_fails);
    RUN(test_methods_filter_routes);
    RUN(test_refused_method_falls_through_to_less_specific);
    RUN(test_method_numbers_out_of_mask_range);
    RUN(test_more_conditions_are_tried_first);
    RUN(test_hosts_exact_and_case_insensitive);
    RUN(test_hosts_ignore_port_and_trailing_dot);
    RUN(test_hosts_wildcard_needs_a_label);
    RUN(test_no_match_is_declined);
    RUN(test_invalid_patterns_are_refused);
    RUN(test_param_count_limit);
    RUN(test_invalid_hosts_are_refused);
    RUN(test_ambiguous_routes_are_refused);
    RUN(test_disjoint_or_ranked_routes_are_accepted);
    RUN(test_error_message_fits_any_buffer);
    RUN(test_router_keeps_its_own_copies);
    RUN(test_ten_thousand_routes_match);
    RUN(test_ten_thousand_siblings_in_any_order);
    RUN(test_free_releases_everything);
    UNIT_EXIT();
}
