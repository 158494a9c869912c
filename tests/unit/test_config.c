/*
 * Unit tests for the config loader (core/config.c): each test writes a
 * config file to /tmp, loads it and checks the C structures or the exact
 * error lines. Also covers mg_cidr_match and the demo config in conf/.
 */
#include <arpa/inet.h>
#include <llhttp.h>
#include <stdlib.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "unit.h"

static char path[64];
static char err[4096];

/* Writes `text` to a fresh temp file (its name in `path`). */
static void write_conf(const char *text)
{
    snprintf(path, sizeof(path), "/tmp/mg_test_config_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0) {
        perror("mkstemp");
        exit(2);
    }
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len) {
        perror("write");
        exit(2);
    }
    close(fd);
}

/* Loads `text` as a config file; the temp file is removed afterwards. */
static int load(const char *text, mg_config_t **cfg)
{
    write_conf(text);
    int rc = mg_config_load(path, cfg, err, sizeof(err));
    unlink(path);
    return rc;
}

/* True when err holds the line "<path>: <rest>". */
static int has_error(const char *rest)
{
    char line[512];
    snprintf(line, sizeof(line), "%s: %s", path, rest);
    const char *p = strstr(err, line);
    if (!p)
        fprintf(stderr, "  missing error line: %s\n  got:\n%s\n", line, err);
    return p && (p[strlen(line)] == '\n' || p[strlen(line)] == '\0');
}

static int count_lines(const char *s)
{
    int n = *s ? 1 : 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static const char *ip_of(const struct sockaddr_storage *ss, char *buf,
                         size_t len)
{
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)ss;
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)ss;
    const void *a = ss->ss_family == AF_INET ? (const void *)&v4->sin_addr
                                             : (const void *)&v6->sin6_addr;
    return inet_ntop(ss->ss_family, a, buf, (socklen_t)len);
}

static unsigned port_of(const struct sockaddr_storage *ss)
{
    return ntohs(ss->ss_family == AF_INET
                     ? ((const struct sockaddr_in *)ss)->sin_port
                     : ((const struct sockaddr_in6 *)ss)->sin6_port);
}

#define MINIMAL                                                                \
    "listen = \"127.0.0.1:0\",\n"                                              \
    "upstreams = { u = { targets = { \"127.0.0.1:9001\" } } },\n"

static const char full_example[] =
    "return {\n"
    "  listen  = { \"127.0.0.1:8080\", \"[::1]:8080\" },\n"
    "  workers = 4,\n"
    "  pid_file = \"/run/mg.pid\",\n"
    "  error_log = \"/var/log/mg.log\",\n"
    "  log_level = \"debug\",\n"
    "  trusted_proxies = { \"127.0.0.1/32\", \"10.1.2.3/8\", \"::1/128\",\n"
    "                      \"192.168.0.7\" },\n"
    "  identity_headers = { \"X-Tenant\", \"x-user-id\" },\n"
    "  limits = { max_uri = \"4k\", max_header_bytes = \"16K\",\n"
    "             max_header_fields = 50, max_body = \"2m\",\n"
    "             header_timeout = 5, body_timeout = 0.5,\n"
    "             keepalive_timeout = 30, send_timeout = 5, max_connections = "
    "500,\n"
    "             drain_timeout = 1.25 },\n"
    "  upstreams = {\n"
    "    users = { targets = { \"127.0.0.1:9001\",\n"
    "                          { \"127.0.0.1:9002\", weight = 2 } },\n"
    "              balance = \"round_robin\",\n"
    "              timeouts = { connect = 2, send = 30, read = 40 },\n"
    "              keepalive = { max_idle = 8, idle_timeout = 15 },\n"
    "              max_pending = 10 },\n"
    "    orders = { targets = { \"[::1]:9003\" } },\n"
    "  },\n"
    "  routes = {\n"
    "    { path = \"/users/*\", upstream = \"users\", name = \"users\",\n"
    "      methods = { \"GET\", \"POST\" },\n"
    "      hosts = { \"api.example.com\", \"*.example.com\" },\n"
    "      strip_prefix = true,\n"
    "      rewrite = \"/v1/users{*}\",\n"
    "      timeouts = { read = 5 }, max_body = \"10m\" },\n"
    "    { path = \"/orders/{id}\", upstream = \"orders\",\n"
    "      strip_prefix = \"/orders\" },\n"
    "  },\n"
    "}\n";

static void full_example_loads_listen_addresses(void)
{
    mg_config_t *cfg;
    char ip[64];
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_INT(cfg->nlisten, ==, 2);
    CHECK_STR(cfg->listen[0].text, "127.0.0.1:8080");
    CHECK_INT(cfg->listen[0].addr.ss_family, ==, AF_INET);
    CHECK_STR(ip_of(&cfg->listen[0].addr, ip, sizeof(ip)), "127.0.0.1");
    CHECK_INT(port_of(&cfg->listen[0].addr), ==, 8080);
    CHECK_INT(cfg->listen[0].addrlen, ==, sizeof(struct sockaddr_in));
    CHECK_INT(cfg->listen[1].addr.ss_family, ==, AF_INET6);
    CHECK_STR(ip_of(&cfg->listen[1].addr, ip, sizeof(ip)), "::1");
    CHECK_INT(port_of(&cfg->listen[1].addr), ==, 8080);
    CHECK_INT(cfg->listen[1].addrlen, ==, sizeof(struct sockaddr_in6));
    mg_config_free(cfg);
}

static void full_example_loads_process_settings(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_STR(cfg->file, path);
    CHECK_INT(cfg->workers, ==, 4);
    CHECK_STR(cfg->pid_file, "/run/mg.pid");
    CHECK_STR(cfg->error_log, "/var/log/mg.log");
    CHECK_INT(cfg->log_level, ==, MG_LOG_DEBUG);
    mg_config_free(cfg);
}

static void full_example_loads_trusted_proxies_with_host_bits_cleared(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_INT(cfg->ntrusted_proxies, ==, 4);
    CHECK_INT(cfg->trusted_proxies[0].family, ==, AF_INET);
    CHECK_INT(cfg->trusted_proxies[0].prefix, ==, 32);
    CHECK_INT(cfg->trusted_proxies[1].prefix, ==, 8);
    CHECK(memcmp(cfg->trusted_proxies[1].addr, "\x0a\0\0\0", 4) == 0);
    CHECK_INT(cfg->trusted_proxies[2].family, ==, AF_INET6);
    CHECK_INT(cfg->trusted_proxies[2].prefix, ==, 128);
    CHECK_INT(cfg->trusted_proxies[3].family, ==, AF_INET);
    CHECK_INT(cfg->trusted_proxies[3].prefix, ==, 32);
    mg_config_free(cfg);
}

static void identity_headers_are_builtins_plus_configured_lowercased(void)
{
    mg_config_t *cfg;
    static const char *const want[] = {
        "x-user-id",        "x-user-roles",
        "x-consumer-id",    "x-consumer-username",
        "x-consumer-roles", "x-consumer-custom-id",
        "x-tenant",
    };
    CHECK_INT(load(full_example, &cfg), ==, 0);
    /* "x-user-id" is configured again: listed once */
    CHECK_INT(cfg->nidentity_headers, ==, MG_ARRAY_SIZE(want));
    for (size_t i = 0; i < MG_ARRAY_SIZE(want); i++)
        CHECK_STR(cfg->identity_headers[i], want[i]);
    mg_config_free(cfg);
}

static void full_example_limits_are_in_bytes_and_ms(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_INT(cfg->limits.max_uri, ==, 4096);
    CHECK_INT(cfg->limits.max_header_bytes, ==, 16384);
    CHECK_INT(cfg->limits.max_header_fields, ==, 50);
    CHECK_INT(cfg->limits.max_body, ==, 2 << 20);
    CHECK_INT(cfg->limits.header_timeout_ms, ==, 5000);
    CHECK_INT(cfg->limits.body_timeout_ms, ==, 500);
    CHECK_INT(cfg->limits.keepalive_timeout_ms, ==, 30000);
    CHECK_INT(cfg->limits.send_timeout_ms, ==, 5000);
    CHECK_INT(cfg->limits.max_connections, ==, 500);
    CHECK_INT(cfg->limits.drain_timeout_ms, ==, 1250);
    mg_config_free(cfg);
}

static void upstreams_are_sorted_by_name_with_targets_and_weights(void)
{
    mg_config_t *cfg;
    char ip[64];
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_INT(cfg->nupstreams, ==, 2);
    CHECK_STR(cfg->upstreams[0].name, "orders");
    CHECK_STR(cfg->upstreams[1].name, "users");
    mg_upstream_conf_t *u = &cfg->upstreams[1];
    CHECK_INT(u->ntargets, ==, 2);
    CHECK_STR(u->targets[0].text, "127.0.0.1:9001");
    CHECK_INT(u->targets[0].weight, ==, 1);
    CHECK_STR(u->targets[1].text, "127.0.0.1:9002");
    CHECK_INT(u->targets[1].weight, ==, 2);
    CHECK_INT(port_of(&u->targets[1].addr), ==, 9002);
    CHECK_STR(ip_of(&u->targets[1].addr, ip, sizeof(ip)), "127.0.0.1");
    CHECK_INT(cfg->upstreams[0].targets[0].addr.ss_family, ==, AF_INET6);
    CHECK_INT(port_of(&cfg->upstreams[0].targets[0].addr), ==, 9003);
    mg_config_free(cfg);
}

static void upstream_timeouts_keepalive_and_pending_are_loaded(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    mg_upstream_conf_t *u = &cfg->upstreams[1];
    CHECK_STR(u->balance, "round_robin");
    CHECK_INT(u->timeouts.connect_ms, ==, 2000);
    CHECK_INT(u->timeouts.send_ms, ==, 30000);
    CHECK_INT(u->timeouts.read_ms, ==, 40000);
    CHECK_INT(u->keepalive_max_idle, ==, 8);
    CHECK_INT(u->keepalive_idle_ms, ==, 15000);
    CHECK_INT(u->max_pending, ==, 10);
    mg_config_free(cfg);
}

static void route_fields_are_loaded(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    CHECK_INT(cfg->nroutes, ==, 2);
    mg_route_conf_t *r = &cfg->routes[0];
    CHECK_STR(r->name, "users");
    CHECK_STR(r->path, "/users/*");
    CHECK_INT(r->upstream, ==, 1);
    CHECK_INT(r->methods, ==, (1ull << HTTP_GET) | (1ull << HTTP_POST));
    CHECK_INT(r->nhosts, ==, 2);
    CHECK_STR(r->hosts[0], "api.example.com");
    CHECK_STR(r->hosts[1], "*.example.com");
    CHECK_STR(r->strip_prefix, "/users");
    CHECK_STR(r->rewrite, "/v1/users{*}");
    CHECK_INT(r->max_body, ==, 10 << 20);
    r = &cfg->routes[1];
    CHECK_STR(r->name, "/orders/{id}");
    CHECK_INT(r->upstream, ==, 0);
    CHECK_STR(r->strip_prefix, "/orders");
    CHECK(r->rewrite == NULL);
    CHECK_INT(r->methods, ==, 0);
    CHECK_INT(r->nhosts, ==, 0);
    CHECK_INT(r->max_body, ==, 2 << 20);
    mg_config_free(cfg);
}

static void route_timeouts_inherit_from_upstream_and_override(void)
{
    mg_config_t *cfg;
    CHECK_INT(load(full_example, &cfg), ==, 0);
    mg_route_conf_t *r = &cfg->routes[0];
    CHECK_INT(r->timeouts.connect_ms, ==, 2000);
    CHECK_INT(r->timeouts.send_ms, ==, 30000);
    CHECK_INT(r->timeouts.read_ms, ==, 5000);
    r = &cfg->routes[1];
    CHECK_INT(r->timeouts.connect_ms, ==, 5000);
    CHECK_INT(r->timeouts.read_ms, ==, 60000);
    mg_config_free(cfg);
}

static void absent_fields_take_their_defaults(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL
                   "routes = { { path = \"/\", upstream = \"u\" } } }",
                   &cfg),
              ==, 0);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    CHECK_INT(cfg->workers, ==, cpus < 1 ? 1 : cpus > 256 ? 256 : cpus);
    CHECK_STR(cfg->pid_file, "/tmp/moongate.pid");
    CHECK_STR(cfg->error_log, "stderr");
    CHECK_INT(cfg->log_level, ==, MG_LOG_INFO);
    CHECK_INT(cfg->ntrusted_proxies, ==, 0);
    CHECK_INT(cfg->nidentity_headers, ==, 6);
    CHECK_INT(cfg->limits.max_uri, ==, 8192);
    CHECK_INT(cfg->limits.max_header_bytes, ==, 32768);
    CHECK_INT(cfg->limits.max_header_fields, ==, 100);
    CHECK_INT(cfg->limits.max_body, ==, 1 << 20);
    CHECK_INT(cfg->limits.header_timeout_ms, ==, 10000);
    CHECK_INT(cfg->limits.body_timeout_ms, ==, 10000);
    CHECK_INT(cfg->limits.keepalive_timeout_ms, ==, 60000);
    CHECK_INT(cfg->limits.send_timeout_ms, ==, 60000);
    CHECK_INT(cfg->limits.max_connections, ==, 10000);
    CHECK_INT(cfg->limits.drain_timeout_ms, ==, 30000);
    mg_upstream_conf_t *u = &cfg->upstreams[0];
    CHECK_STR(u->balance, "round_robin");
    CHECK_INT(u->timeouts.connect_ms, ==, 5000);
    CHECK_INT(u->timeouts.send_ms, ==, 60000);
    CHECK_INT(u->timeouts.read_ms, ==, 60000);
    CHECK_INT(u->keepalive_max_idle, ==, 64);
    CHECK_INT(u->keepalive_idle_ms, ==, 60000);
    CHECK_INT(u->max_pending, ==, 1024);
    mg_route_conf_t *r = &cfg->routes[0];
    CHECK_STR(r->name, "/");
    CHECK_INT(r->methods, ==, 0);
    CHECK(r->strip_prefix == NULL && r->rewrite == NULL);
    CHECK_INT(r->max_body, ==, 1 << 20);
    CHECK_INT(r->timeouts.read_ms, ==, 60000);
    mg_config_free(cfg);
}

static void listen_accepts_a_single_string_and_a_bare_port(void)
{
    mg_config_t *cfg;
    char ip[64];
    CHECK_INT(load("return { listen = \":8081\" }", &cfg), ==, 0);
    CHECK_INT(cfg->nlisten, ==, 1);
    CHECK_STR(cfg->listen[0].text, ":8081");
    CHECK_STR(ip_of(&cfg->listen[0].addr, ip, sizeof(ip)), "0.0.0.0");
    CHECK_INT(port_of(&cfg->listen[0].addr), ==, 8081);
    mg_config_free(cfg);
}

static void listen_http2_defaults_on_and_can_be_turned_off(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = { \":8081\", { \":8082\" }, "
                   "{ \":8083\", http2 = false } }, "
                   "limits = { h2_max_concurrent_streams = 10 } }",
                   &cfg),
              ==, 0);
    CHECK_INT(cfg->nlisten, ==, 3);
    CHECK_INT(cfg->listen[0].http2, ==, 1);
    CHECK_INT(cfg->listen[1].http2, ==, 1);
    CHECK_INT(cfg->listen[2].http2, ==, 0);
    CHECK_INT(cfg->limits.h2_max_concurrent_streams, ==, 10);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = \":8081\" }", &cfg), ==, 0);
    CHECK_INT(cfg->limits.h2_max_concurrent_streams, ==, 100);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = { { \":8081\", http2 = \"no\" } }, "
                   "limits = { h2_max_concurrent_streams = 0 } }",
                   &cfg),
              <, 0);
    CHECK(has_error(
        "top level: listen[1].http2: expected a boolean, got string"));
    CHECK(has_error("top level: limits.h2_max_concurrent_streams: must be "
                    "between 1 and 100000, got 0"));
}

static void no_routes_and_no_upstreams_are_allowed(void)
{
    mg_config_t *cfg;
    CHECK_INT(
        load("return { listen = { \"127.0.0.1:0\" }, routes = {} }", &cfg), ==,
        0);
    CHECK_INT(cfg->nroutes, ==, 0);
    CHECK_INT(cfg->nupstreams, ==, 0);
    mg_config_free(cfg);
}

static void sizes_accept_plain_bytes_and_binary_suffixes(void)
{
    mg_config_t *cfg;
    CHECK_INT(
        load("return { limits = { max_uri = 100,\n"
             "  max_header_bytes = \"123\", max_body = \"3G\" },\n" MINIMAL
             "routes = { { path = \"/a\", upstream = \"u\",\n"
             "  max_body = \"7k\" } } }",
             &cfg),
        ==, 0);
    CHECK_INT(cfg->limits.max_uri, ==, 100);
    CHECK_INT(cfg->limits.max_header_bytes, ==, 123);
    CHECK_INT(cfg->limits.max_body, ==, 3ull << 30);
    CHECK_INT(cfg->routes[0].max_body, ==, 7 << 10);
    mg_config_free(cfg);
}

static void target_host_names_are_resolved(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", upstreams = { u = {\n"
                   "  targets = { \"localhost:80\" } } } }",
                   &cfg),
              ==, 0);
    mg_target_conf_t *t = &cfg->upstreams[0].targets[0];
    CHECK_STR(t->text, "localhost:80");
    CHECK(t->addr.ss_family == AF_INET || t->addr.ss_family == AF_INET6);
    CHECK_INT(port_of(&t->addr), ==, 80);
    mg_config_free(cfg);
}

static void strip_prefix_true_on_catch_all_strips_nothing(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = { { path = \"/*\",\n"
                   "  upstream = \"u\", strip_prefix = true },\n"
                   " { path = \"/b/*\", upstream = \"u\",\n"
                   "   strip_prefix = false } } }",
                   &cfg),
              ==, 0);
    CHECK(cfg->routes[0].strip_prefix == NULL);
    CHECK(cfg->routes[1].strip_prefix == NULL);
    mg_config_free(cfg);
}

static void missing_listen_is_reported(void)
{
    mg_config_t *cfg = (mg_config_t *)1;
    CHECK_INT(load("return {}", &cfg), ==, MG_ECONFIG);
    CHECK(cfg == NULL);
    CHECK(has_error("top level: listen: required"));
    CHECK_INT(count_lines(err), ==, 1);
}

static void route_naming_a_missing_upstream_is_reported(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { path = \"/ok\", upstream = \"u\" },\n"
                   "  { path = \"/users/*\", upstream = \"user\" } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("routes[2] \"/users/*\": upstream: "
                    "no upstream named \"user\""));
    CHECK_INT(count_lines(err), ==, 1);
}

static void invalid_target_port_is_reported(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", upstreams = { users = {\n"
                   "  targets = { \"127.0.0.1:1\", \"127.0.0.1:99999\",\n"
                   "              \"127.0.0.1:0\", \"127.0.0.1\",\n"
                   "              \"::1:80\", \":80\" } } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("upstreams.users: targets[2]: invalid port \"99999\""));
    CHECK(has_error("upstreams.users: targets[3]: invalid port \"0\""));
    CHECK(has_error("upstreams.users: targets[4]: invalid address "
                    "\"127.0.0.1\" (expected host:port or [v6]:port)"));
    CHECK(has_error("upstreams.users: targets[5]: invalid address "
                    "\"::1:80\" (expected host:port or [v6]:port)"));
    CHECK(has_error("upstreams.users: targets[6]: invalid address "
                    "\":80\" (expected host:port or [v6]:port)"));
    CHECK_INT(count_lines(err), ==, 5);
}

static void unresolvable_target_is_named(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", upstreams = { users = {\n"
                   "  targets = { \"no-such-host.invalid:80\" } } } }",
                   &cfg),
              ==, MG_ECONFIG);
    char want[256];
    snprintf(want, sizeof(want),
             "%s: upstreams.users: targets[1]: cannot "
             "resolve \"no-such-host.invalid\": ",
             path);
    CHECK(strstr(err, want) != NULL);
}

static void wrong_types_say_what_was_expected(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = 8080, workers = {}, pid_file = 1,\n"
                   "  limits = { max_body = true, header_timeout = \"5\" },\n"
                   "  upstreams = { u = { targets = { 5 } } },\n"
                   "  routes = { { path = 7, upstream = \"u\" }, \"x\" } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: listen: expected a list, got number"));
    CHECK(has_error("top level: workers: expected \"auto\" or an integer, "
                    "got table"));
    CHECK(has_error("top level: pid_file: expected a string, got number"));
    CHECK(has_error("top level: limits.max_body: expected a size (bytes, "
                    "or a string like \"8k\"), got boolean"));
    CHECK(has_error("top level: limits.header_timeout: expected a number "
                    "of seconds, got string"));
    CHECK(has_error("upstreams.u: targets[1]: expected \"host:port\" or "
                    "{ \"host:port\", weight = n }, got number"));
    CHECK(has_error("routes[1]: path: expected a string, got number"));
    CHECK(has_error("top level: routes[2]: expected a table, got string"));
    CHECK_INT(count_lines(err), ==, 8);
}

static void unknown_fields_are_errors_at_every_level(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", listn = 1,\n"
                   "  limits = { max_bdy = 1 },\n"
                   "  upstreams = { u = { targts = 1, targets = {\n"
                   "    { \"127.0.0.1:1\", wieght = 2 } },\n"
                   "    timeouts = { conect = 1 }, keepalive = { x = 1 } } },\n"
                   "  routes = { { path = \"/a\", upstream = \"u\",\n"
                   "    methds = { \"GET\" }, timeouts = { red = 1 },\n"
                   "    \"positional\" } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: listn: unknown field"));
    CHECK(has_error("top level: limits.max_bdy: unknown field"));
    CHECK(has_error("upstreams.u: targts: unknown field"));
    CHECK(has_error("upstreams.u: targets[1].wieght: unknown field"));
    CHECK(has_error("upstreams.u: timeouts.conect: unknown field"));
    CHECK(has_error("upstreams.u: keepalive.x: unknown field"));
    CHECK(has_error("routes[1] \"/a\": methds: unknown field"));
    CHECK(has_error("routes[1] \"/a\": timeouts.red: unknown field"));
    CHECK(has_error("routes[1] \"/a\": [1]: unknown field"));
    CHECK_INT(count_lines(err), ==, 9);
}

static void reserved_keys_are_accepted_and_ignored(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\",\n"
                   "  admin = { listen = \"127.0.0.1:9901\" },\n"
                   "  shared = { cache = \"128m\" }, redis = { url = 1 },\n"
                   "  plugin_paths = { \"conf/plugins\" }, watch = true,\n"
                   "  plugins = { acl = { allow = { \"x\" } } },\n"
                   "  upstreams = { u = { targets = { \"127.0.0.1:1\" },\n"
                   "    health = { path = \"/health\" },\n"
                   "    breaker = { failures = 5 } } },\n"
                   "  routes = { { path = \"/a\", upstream = \"u\",\n"
                   "    plugins = {}, handler = function() end,\n"
                   "    order = 3 } } }",
                   &cfg),
              ==, 0);
    CHECK_INT(cfg->nroutes, ==, 1);
    mg_config_free(cfg);
}

static void admin_listener_is_loaded_loopback_only(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\",\n"
                   "  admin = { listen = \"127.0.0.1:9901\", token = \"t\" } }",
                   &cfg),
              ==, 0);
    CHECK_STR(cfg->admin.listen.text, "127.0.0.1:9901");
    CHECK_STR(cfg->admin.token, "t");
    CHECK_INT(cfg->admin.allow_remote, ==, 0);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = \":0\",\n"
                   "  admin = { listen = \"[::1]:9901\" } }",
                   &cfg),
              ==, 0);
    CHECK(cfg->admin.token == NULL);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = \":0\",\n"
                   "  admin = { listen = \"0.0.0.0:9901\",\n"
                   "            allow_remote = true } }",
                   &cfg),
              ==, 0);
    CHECK_INT(cfg->admin.allow_remote, ==, 1);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = \":0\" }", &cfg), ==, 0);
    CHECK(cfg->admin.listen.text == NULL);
    mg_config_free(cfg);
}

static void admin_listener_errors_are_reported(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\",\n"
                   "  admin = { listen = \":9901\" } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: admin.listen: \":9901\" is not a loopback "
                    "address; the admin API can reload the gateway, so set "
                    "admin.allow_remote = true (and a token) to expose it"));
    CHECK_INT(load("return { listen = \"127.0.0.1:9000\",\n"
                   "  admin = { token = \"\", allow_remote = 1, port = 3 } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: admin.port: unknown field"));
    CHECK(has_error("top level: admin.allow_remote: expected a boolean, got "
                    "number"));
    CHECK(has_error("top level: admin.listen: required"));
    CHECK(has_error("top level: admin.token: must not be empty"));
    CHECK_INT(load("return { listen = \"127.0.0.1:9000\",\n"
                   "  admin = { listen = \"127.0.0.1:9000\" } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: admin.listen: \"127.0.0.1:9000\" is also a "
                    "proxy listener"));
    CHECK_INT(load("return { listen = \":0\", watch = \"yes\" }", &cfg), ==,
              MG_ECONFIG);
    CHECK(has_error("top level: watch: expected a boolean, got string"));
    CHECK_INT(load("return { listen = \":0\", watch = true }", &cfg), ==, 0);
    CHECK_INT(cfg->watch, ==, 1);
    mg_config_free(cfg);
}

static void invalid_values_are_reported(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = { \"1.2.3.4:70000\" }, workers = 0,\n"
                   "  log_level = \"loud\", trusted_proxies = { \"10/8\",\n"
                   "    \"10.0.0.0/33\" }, identity_headers = { \"X Bad\" },\n"
                   "  limits = { max_uri = \"8x\", body_timeout = -1,\n"
                   "    max_header_fields = 1.5 },\n"
                   "  upstreams = { u = { balance = \"random\",\n"
                   "    targets = { { \"127.0.0.1:1\", weight = 1001 } } } },\n"
                   "  routes = { { path = \"a\", upstream = \"u\",\n"
                   "    methods = { \"get\" }, rewrite = \"v1\" } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: listen[1]: invalid port \"70000\""));
    CHECK(has_error("top level: workers: must be between 1 and 256, got 0"));
    CHECK(has_error("top level: log_level: expected one of error, warn, "
                    "info, debug, got \"loud\""));
    CHECK(has_error("top level: trusted_proxies[1]: invalid CIDR \"10/8\""));
    CHECK(has_error("top level: trusted_proxies[2]: invalid CIDR "
                    "\"10.0.0.0/33\""));
    CHECK(has_error("top level: identity_headers[1]: invalid header name "
                    "\"X Bad\""));
    CHECK(has_error("top level: limits.max_uri: invalid size \"8x\" "
                    "(expected bytes, or \"<n>k\", \"<n>m\", \"<n>g\")"));
    CHECK(has_error("top level: limits.body_timeout: must be between 0 and "
                    "31536000 seconds, got -1"));
    CHECK(has_error("top level: limits.max_header_fields: expected an "
                    "integer, got 1.5"));
    CHECK(has_error("upstreams.u: balance: expected one of \"round_robin\", "
                    "\"weighted\", \"least_conn\", \"hash\", \"p2c\", got "
                    "\"random\""));
    CHECK(has_error("upstreams.u: targets[1].weight: must be between 1 and "
                    "1000, got 1001"));
    CHECK(has_error("routes[1] \"a\": path: must start with '/'"));
    CHECK(has_error("routes[1] \"a\": methods[1]: unknown method \"get\" "
                    "(expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, "
                    "OPTIONS, TRACE, PATCH)"));
    CHECK(has_error("routes[1] \"a\": rewrite: must start with '/'"));
    CHECK_INT(count_lines(err), ==, 14);
}

static void resilience_options_are_loaded(void)
{
    mg_config_t *cfg;
    CHECK_INT(
        load("return { listen = \":0\", upstreams = { u = {\n"
             "  targets = { \"127.0.0.1:9001\",\n"
             "              { \"127.0.0.1:9002\", weight = 2 } },\n"
             "  balance = \"hash\", hash_on = \"header:X-User\",\n"
             "  health = { path = \"/up\", interval = 0.5, timeout = 0.2,\n"
             "             healthy = 1, unhealthy = 4, statuses = { 204 } },\n"
             "  passive = { failures = 2, statuses = { 500 },\n"
             "              timeouts = false, down_for = 3 },\n"
             "  breaker = { failures = 4, failure_ratio = 0.25, window = 5,\n"
             "              min_requests = 8, open_for = 2,\n"
             "              half_open_probes = 1 },\n"
             "  retries = { count = 2, on = { \"timeout\", 502 },\n"
             "              budget = 0.5, retry_non_idempotent = true,\n"
             "              try_timeout = 0.3, total_timeout = 2 } } },\n"
             "  routes = { { path = \"/a\", upstream = \"u\" } } }",
             &cfg),
        ==, 0);
    const mg_upstream_conf_t *u = &cfg->upstreams[0];
    CHECK_INT(u->balance_kind, ==, 3);
    CHECK_INT(u->hash_on, ==, MG_HASH_ON_HEADER);
    CHECK_STR(u->hash_header, "X-User");
    CHECK_INT(u->targets[1].weight, ==, 2);
    CHECK(u->health.enabled);
    CHECK_STR(u->health.path, "/up");
    CHECK_INT(u->health.interval_ms, ==, 500);
    CHECK_INT(u->health.timeout_ms, ==, 200);
    CHECK_INT(u->health.healthy, ==, 1);
    CHECK_INT(u->health.unhealthy, ==, 4);
    CHECK(mg_status_set_has(&u->health.statuses, 204));
    CHECK(!mg_status_set_has(&u->health.statuses, 200));
    CHECK(u->passive.enabled);
    CHECK_INT(u->passive.failures, ==, 2);
    CHECK(mg_status_set_has(&u->passive.statuses, 500));
    CHECK(!mg_status_set_has(&u->passive.statuses, 502));
    CHECK_INT(u->passive.timeouts, ==, 0);
    CHECK_INT(u->passive.down_ms, ==, 3000);
    CHECK(u->breaker.enabled);
    CHECK_INT(u->breaker.failures, ==, 4);
    CHECK(u->breaker.failure_ratio == 0.25);
    CHECK_INT(u->breaker.window_ms, ==, 5000);
    CHECK_INT(u->breaker.min_requests, ==, 8);
    CHECK_INT(u->breaker.open_ms, ==, 2000);
    CHECK_INT(u->breaker.half_open_probes, ==, 1);
    CHECK_INT(u->retries.count, ==, 2);
    CHECK_INT(u->retries.on_connect, ==, 0);
    CHECK_INT(u->retries.on_timeout, ==, 1);
    CHECK(mg_status_set_has(&u->retries.statuses, 502));
    CHECK(u->retries.budget == 0.5);
    CHECK_INT(u->retries.non_idempotent, ==, 1);
    CHECK_INT(u->retries.try_timeout_ms, ==, 300);
    CHECK_INT(u->retries.total_timeout_ms, ==, 2000);
    mg_config_free(cfg);
}

static void resilience_defaults(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", upstreams = { u = {\n"
                   "  targets = { \"127.0.0.1:9001\" } } } }",
                   &cfg),
              ==, 0);
    const mg_upstream_conf_t *u = &cfg->upstreams[0];
    CHECK_INT(u->balance_kind, ==, 0);
    CHECK(!u->health.enabled);
    CHECK(!u->passive.enabled);
    CHECK(!u->breaker.enabled);
    CHECK_INT(u->retries.count, ==, 1);
    CHECK_INT(u->retries.on_connect, ==, 1);
    CHECK_INT(u->retries.non_idempotent, ==, 0);
    mg_config_free(cfg);
}

static void bad_resilience_options_name_upstream_and_field(void)
{
    mg_config_t *cfg;
    CHECK_INT(
        load("return { listen = \":0\", upstreams = { u = {\n"
             "  targets = { \"127.0.0.1:9001\" }, hash_on = \"cookie\",\n"
             "  health = { path = \"up\", interval = 0, statuses = { 99 },\n"
             "             nope = 1 },\n"
             "  passive = { failures = 0, timeouts = 1 },\n"
             "  breaker = { failure_ratio = 2, half_open_probes = 0 },\n"
             "  retries = { on = { \"reset\", \"x\" }, budget = -1 } } } }",
             &cfg),
        ==, MG_ECONFIG);
    CHECK(has_error("upstreams.u: hash_on: expected \"ip\", \"consumer\", "
                    "\"path\" or \"header:NAME\", got \"cookie\""));
    CHECK(has_error("upstreams.u: hash_on: only used with balance = "
                    "\"hash\""));
    CHECK(has_error("upstreams.u: health.nope: unknown field"));
    CHECK(has_error("upstreams.u: health.path: must start with '/'"));
    CHECK(has_error("upstreams.u: health.interval: must be at least 0.01 "
                    "seconds"));
    CHECK(has_error("upstreams.u: health.statuses[1]: must be between 100 "
                    "and 599, got 99"));
    CHECK(has_error("upstreams.u: passive.failures: must be between 1 and "
                    "1000, got 0"));
    CHECK(has_error("upstreams.u: passive.timeouts: expected a boolean, got "
                    "number"));
    CHECK(has_error("upstreams.u: breaker.failure_ratio: must be between 0 "
                    "and 1, got 2"));
    CHECK(has_error("upstreams.u: breaker.half_open_probes: must be between "
                    "1 and 1000, got 0"));
    CHECK(has_error("upstreams.u: retries.on[1]: expected \"connect\", "
                    "\"timeout\" or a status, got \"reset\""));
    CHECK(has_error("upstreams.u: retries.on[2]: expected \"connect\", "
                    "\"timeout\" or a status, got \"x\""));
    CHECK(has_error("upstreams.u: retries.budget: must be between 0 and 1, "
                    "got -1"));
    CHECK_INT(count_lines(err), ==, 13);
}

static void host_name_targets_are_marked_for_re_resolution(void)
{
    mg_config_t *cfg;
    CHECK_INT(
        load("return { listen = \":0\", upstreams = {\n"
             "  u = { targets = { \"localhost:9001\", \"127.0.0.1:9002\",\n"
             "                    \"[::1]:9003\" }, dns_refresh = 5 },\n"
             "  v = { targets = { \"localhost:9001\" }, dns_refresh = 0 } } }",
             &cfg),
        ==, 0);
    const mg_upstream_conf_t *u = &cfg->upstreams[0];
    CHECK_STR(u->targets[0].host, "localhost");
    CHECK_INT(u->targets[0].resolve_ms, ==, 5000);
    CHECK(u->targets[1].host == NULL);
    CHECK_INT(u->targets[1].resolve_ms, ==, 0);
    CHECK(u->targets[2].host == NULL);
    CHECK_INT(cfg->upstreams[1].targets[0].resolve_ms, ==, 0);
    mg_config_free(cfg);
    CHECK_INT(load("return { listen = \":0\", upstreams = {\n"
                   "  u = { targets = { \"localhost:9001\" },\n"
                   "        dns_refresh = 0.05 } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("upstreams.u: dns_refresh: must be 0 (never) or at least "
                    "0.1 seconds"));
}

static void upstream_without_targets_is_an_error(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = \":0\", upstreams = {\n"
                   "  a = { targets = {} },\n"
                   "  b = { balance = \"round_robin\" },\n"
                   "  c = \"nope\" },\n"
                   "  routes = { { path = \"/c\", upstream = \"c\" } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("upstreams.a: targets: must have at least one target"));
    CHECK(has_error("upstreams.b: targets: required"));
    CHECK(has_error("upstreams.c: upstream: expected a table, got string"));
    /* the route naming the broken upstream gets no second error */
    CHECK_INT(count_lines(err), ==, 3);
}

static void strip_prefix_true_needs_a_wildcard_path(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { path = '/a', upstream = 'u', strip_prefix = true },\n"
                   "  { path = \"/b/{id}/*\", upstream = \"u\",\n"
                   "    strip_prefix = true },\n"
                   "  { path = '/c/*', upstream = 'u', strip_prefix = 1 },\n"
                   "  { path = '/d/*', upstream = 'u', strip_prefix = 'd' },\n"
                   "} }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("routes[1] \"/a\": strip_prefix: true needs a path "
                    "ending in \"/*\""));
    CHECK(has_error("routes[2] \"/b/{id}/*\": strip_prefix: true needs a "
                    "literal path, but the path has parameters"));
    CHECK(has_error("routes[3] \"/c/*\": strip_prefix: expected a string or "
                    "true, got number"));
    CHECK(has_error("routes[4] \"/d/*\": strip_prefix: must start with '/'"));
    CHECK_INT(count_lines(err), ==, 4);
}

static void handler_routes_need_no_upstream_and_a_function(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { path = \"/h\", handler = function() end },\n"
                   "} }",
                   &cfg),
              ==, 0);
    CHECK_INT(cfg->routes[0].upstream, ==, -1);
    CHECK_INT(cfg->routes[0].has_handler, ==, 1);
    mg_config_free(cfg);
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { path = \"/h\", handler = 5 },\n"
                   "} }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("routes[1] \"/h\": handler: expected a function, got "
                    "number"));
}

static void missing_route_fields_and_empty_lists_are_reported(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { upstream = \"u\" },\n"
                   "  { path = \"/x\", methods = {}, hosts = { \"\" } },\n"
                   "  { path = \"/y\", upstream = \"u\", hosts = {} },\n"
                   "} }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("routes[1]: path: required"));
    CHECK(has_error("routes[2] \"/x\": upstream: required (or a handler)"));
    CHECK(has_error("routes[2] \"/x\": methods: must not be empty (leave it "
                    "out for any method)"));
    CHECK(has_error("routes[2] \"/x\": hosts[1]: must not be empty"));
    CHECK(has_error("routes[3] \"/y\": hosts: must not be empty (leave it "
                    "out for any host)"));
    CHECK_INT(count_lines(err), ==, 5);
}

static void lists_with_holes_or_keys_are_rejected(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = { \"127.0.0.1:1\", x = 1 },\n"
                   "  routes = { [2] = { path = \"/\" } } }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: listen: expected a list (keys 1..n without "
                    "holes)"));
    CHECK(has_error("top level: routes: expected a list (keys 1..n without "
                    "holes)"));
    CHECK_INT(count_lines(err), ==, 2);
}

static void lua_syntax_error_names_the_file(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return { listen = }", &cfg), ==, MG_ECONFIG);
    char want[256];
    snprintf(want, sizeof(want), "%s:1: unexpected symbol near '}'", path);
    CHECK_STR(err, want);
}

static void lua_runtime_error_names_the_file(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("error('boom', 0)", &cfg), ==, MG_ECONFIG);
    CHECK(has_error("boom"));
    CHECK_INT(load("local x = nil\nreturn x.y", &cfg), ==, MG_ECONFIG);
    char want[256];
    snprintf(want, sizeof(want), "%s:2: attempt to index local 'x'", path);
    CHECK(strncmp(err, want, strlen(want)) == 0);
}

static void chunk_must_return_a_table(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("local t = {}", &cfg), ==, MG_ECONFIG);
    CHECK(has_error("the chunk must return a table, got nil"));
    CHECK_INT(load("return 'x'", &cfg), ==, MG_ECONFIG);
    CHECK(has_error("the chunk must return a table, got string"));
}

static void missing_file_is_reported(void)
{
    mg_config_t *cfg;
    int rc =
        mg_config_load("/tmp/mg-no-such-config.lua", &cfg, err, sizeof(err));
    CHECK_INT(rc, ==, MG_ECONFIG);
    CHECK(strncmp(err, "/tmp/mg-no-such-config.lua: cannot open", 39) == 0);
}

static void env_returns_variable_or_default(void)
{
    mg_config_t *cfg;
    setenv("MG_TEST_LISTEN", "127.0.0.1:7001", 1);
    unsetenv("MG_TEST_UNSET");
    CHECK_INT(load("return { listen = env('MG_TEST_LISTEN'),\n"
                   "  error_log = env('MG_TEST_UNSET', 'from-default'),\n"
                   "  pid_file = env('MG_TEST_UNSET') or 'nil-without' }",
                   &cfg),
              ==, 0);
    CHECK_STR(cfg->listen[0].text, "127.0.0.1:7001");
    CHECK_STR(cfg->error_log, "from-default");
    CHECK_STR(cfg->pid_file, "nil-without");
    mg_config_free(cfg);
}

static void metatables_in_the_config_are_not_consulted(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return setmetatable({}, { __index = function()\n"
                   "  error('metamethod ran') end })",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("top level: listen: required"));
    CHECK(strstr(err, "metamethod") == NULL);
}

static void error_output_is_truncated_safely(void)
{
    mg_config_t *cfg;
    write_conf("return { a = 1, b = 2, c = 3, d = 4, e = 5 }");
    char small[24];
    memset(small, 'Z', sizeof(small));
    CHECK_INT(mg_config_load(path, &cfg, small, 20), ==, MG_ECONFIG);
    CHECK_INT(strlen(small), ==, 19);
    CHECK(small[20] == 'Z');
    memset(small, 'Z', sizeof(small));
    CHECK_INT(mg_config_load(path, &cfg, small, 1), ==, MG_ECONFIG);
    CHECK(small[0] == '\0' && small[1] == 'Z');
    CHECK_INT(mg_config_load(path, &cfg, NULL, 0), ==, MG_ECONFIG);
    CHECK_INT(mg_config_load(path, &cfg, err, sizeof(err)), ==, MG_ECONFIG);
    CHECK_INT(count_lines(err), ==, 6); /* 5 unknown fields + listen */
    unlink(path);
}

static void each_error_stays_on_one_line(void)
{
    mg_config_t *cfg;
    CHECK_INT(load("return {" MINIMAL "routes = {\n"
                   "  { path = '/a\\nb', upstream = 'x' },\n"
                   "  { path = '/c', upstream = 'u', hosts = { 'h\\0x' } },\n"
                   "} }",
                   &cfg),
              ==, MG_ECONFIG);
    CHECK(has_error("routes[1] \"/a?b\": upstream: no upstream named "
                    "\"x\""));
    CHECK(has_error("routes[2] \"/c\": hosts[1]: must not contain NUL "
                    "bytes"));
    CHECK_INT(count_lines(err), ==, 2);
}

static struct sockaddr_storage sa(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1)
        v4->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1)
        v6->sin6_family = AF_INET6;
    return ss;
}

static int match(const mg_config_t *cfg, const char *ip)
{
    struct sockaddr_storage ss = sa(ip);
    return mg_cidr_match(cfg->trusted_proxies, cfg->ntrusted_proxies,
                         (const struct sockaddr *)&ss);
}

static mg_config_t *proxies(const char *list)
{
    char text[512];
    mg_config_t *cfg = NULL;
    snprintf(text, sizeof(text),
             "return { listen = ':0', trusted_proxies = { %s } }", list);
    if (load(text, &cfg) != 0)
        fprintf(stderr, "  %s\n", err);
    return cfg;
}

static void cidr_matches_ipv4_blocks(void)
{
    mg_config_t *cfg = proxies("'10.0.0.0/8', '192.168.1.7', "
                               "'172.16.0.0/12', '0.0.0.0/0'");
    CHECK(cfg != NULL);
    /* the first three blocks only: 0.0.0.0/0 would match everything */
    mg_cidr_t *b = cfg->trusted_proxies;
    struct sockaddr_storage s = sa("10.200.3.4");
    CHECK(mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("10.255.255.255");
    CHECK(mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("192.168.1.7");
    CHECK(mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("11.0.0.1");
    CHECK(!mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("192.168.1.8");
    CHECK(!mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("172.31.255.255");
    CHECK(mg_cidr_match(b, 3, (struct sockaddr *)&s));
    s = sa("172.32.0.0");
    CHECK(!mg_cidr_match(b, 3, (struct sockaddr *)&s));
    CHECK(match(cfg, "8.8.8.8")); /* 0.0.0.0/0 */
    CHECK(!match(cfg, "::1"));    /* v4 blocks never match v6 */
    mg_config_free(cfg);
}

static void cidr_matches_ipv6_blocks(void)
{
    mg_config_t *cfg = proxies("'::1', '2001:db8::/33', 'fe80::/10'");
    CHECK(cfg != NULL);
    CHECK(match(cfg, "::1"));
    CHECK(!match(cfg, "::2"));
    CHECK(match(cfg, "2001:db8:7fff::1"));
    CHECK(!match(cfg, "2001:db8:8000::1"));
    CHECK(match(cfg, "febf::1"));
    CHECK(!match(cfg, "fec0::1"));
    CHECK(!match(cfg, "127.0.0.1"));
    mg_config_free(cfg);
}

static void cidr_matches_v4_mapped_v6_against_v4_blocks(void)
{
    mg_config_t *cfg = proxies("'10.0.0.0/8', '::/0'");
    CHECK(cfg != NULL);
    CHECK(match(cfg, "::ffff:10.1.2.3"));
    CHECK(match(cfg, "2001:db8::1")); /* ::/0 */
    mg_config_free(cfg);
    cfg = proxies("'10.0.0.0/8'");
    CHECK(cfg != NULL);
    CHECK(match(cfg, "::ffff:10.1.2.3"));
    CHECK(!match(cfg, "::ffff:11.1.2.3"));
    CHECK(!match(cfg, "::a01:203")); /* v4-compatible is not mapped */
    mg_config_free(cfg);
    cfg = proxies("'::/0'");
    CHECK(cfg != NULL);
    CHECK(!match(cfg, "::ffff:10.1.2.3")); /* a mapped client is IPv4 */
    mg_config_free(cfg);
}

/* The tests run from the repository root or from a build directory. */
static void demo_config_loads_without_error(void)
{
    static const char *const where[] = {
        "conf/moongate.lua",
        "../conf/moongate.lua",
        "../../conf/moongate.lua",
        "../../../conf/moongate.lua",
    };
    const char *file = NULL;
    for (size_t i = 0; i < MG_ARRAY_SIZE(where) && !file; i++)
        if (access(where[i], R_OK) == 0)
            file = where[i];
    CHECK(file != NULL);
    mg_config_t *cfg;
    int rc = mg_config_load(file, &cfg, err, sizeof(err));
    if (rc != 0)
        FAIL_AT("%s", err);
    /* One process: public routes proxied back to this gateway, where Lua
     * handlers play the demo services. */
    CHECK_INT(cfg->nlisten, ==, 1);
    CHECK_STR(cfg->listen[0].text, "0.0.0.0:8080");
    CHECK_INT(cfg->nupstreams, ==, 1);
    CHECK_STR(cfg->upstreams[0].name, "demo");
    CHECK_INT(port_of(&cfg->upstreams[0].targets[0].addr), ==, 8080);
    CHECK_INT(cfg->nzones, ==, 1);
    CHECK_STR(cfg->routes[0].path, "/users/*");
    CHECK_INT(cfg->routes[0].upstream, ==, 0);
    size_t handlers = 0;
    for (size_t i = 0; i < cfg->nroutes; i++)
        handlers += cfg->routes[i].has_handler;
    CHECK_INT(handlers, >=, 4);
    mg_config_free(cfg);
}

int main(void)
{
    RUN(full_example_loads_listen_addresses);
    RUN(full_example_loads_process_settings);
    RUN(full_example_loads_trusted_proxies_with_host_bits_cleared);
    RUN(identity_headers_are_builtins_plus_configured_lowercased);
    RUN(full_example_limits_are_in_bytes_and_ms);
    RUN(upstreams_are_sorted_by_name_with_targets_and_weights);
    RUN(upstream_timeouts_keepalive_and_pending_are_loaded);
    RUN(route_fields_are_loaded);
    RUN(route_timeouts_inherit_from_upstream_and_override);
    RUN(absent_fields_take_their_defaults);
    RUN(listen_accepts_a_single_string_and_a_bare_port);
    RUN(listen_http2_defaults_on_and_can_be_turned_off);
    RUN(no_routes_and_no_upstreams_are_allowed);
    RUN(sizes_accept_plain_bytes_and_binary_suffixes);
    RUN(target_host_names_are_resolved);
    RUN(strip_prefix_true_on_catch_all_strips_nothing);
    RUN(missing_listen_is_reported);
    RUN(route_naming_a_missing_upstream_is_reported);
    RUN(invalid_target_port_is_reported);
    RUN(unresolvable_target_is_named);
    RUN(wrong_types_say_what_was_expected);
    RUN(unknown_fields_are_errors_at_every_level);
    RUN(reserved_keys_are_accepted_and_ignored);
    RUN(admin_listener_is_loaded_loopback_only);
    RUN(admin_listener_errors_are_reported);
    RUN(invalid_values_are_reported);
    RUN(resilience_options_are_loaded);
    RUN(resilience_defaults);
    RUN(bad_resilience_options_name_upstream_and_field);
    RUN(host_name_targets_are_marked_for_re_resolution);
    RUN(upstream_without_targets_is_an_error);
    RUN(strip_prefix_true_needs_a_wildcard_path);
    RUN(missing_route_fields_and_empty_lists_are_reported);
    RUN(handler_routes_need_no_upstream_and_a_function);
    RUN(lists_with_holes_or_keys_are_rejected);
    RUN(lua_syntax_error_names_the_file);
    RUN(lua_runtime_error_names_the_file);
    RUN(chunk_must_return_a_table);
    RUN(missing_file_is_reported);
    RUN(env_returns_variable_or_default);
    RUN(metatables_in_the_config_are_not_consulted);
    RUN(error_output_is_truncated_safely);
    RUN(each_error_stays_on_one_line);
    RUN(cidr_matches_ipv4_blocks);
    RUN(cidr_matches_ipv6_blocks);
    RUN(cidr_matches_v4_mapped_v6_against_v4_blocks);
    RUN(demo_config_loads_without_error);
    UNIT_EXIT();
}
