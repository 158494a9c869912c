/*
 * Unit tests for the shared metrics (core/metrics.c): the route-name
 * registry, recording into shards and the Prometheus text it renders
 * (cumulative buckets, escaping, gauges), the shared area seen from a
 * forked child, and plugin counters (the gw.metrics FFI functions).
 */
#include <llhttp.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "ffi.h"
#include "metrics.h"
#include "unit.h"

static mg_metrics_master_t master = {.config_hash = "abc",
                                     .reloads_ok = 2,
                                     .reloads_failed = 1,
                                     .worker_restarts = 3,
                                     .workers = 2};

/* The rendered text (caller frees). */
static char *render(void)
{
    mg_strbuf_t b = {0};
    mg_metrics_render(&b, &master);
    return b.p;
}

/* True when `line` (without its newline) is one of text's lines. */
static int has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return 1;
    fprintf(stderr, "  missing line: %s\n", line);
    return 0;
}

static void record(const mg_route_conf_t *rt, unsigned method, int status,
                   uint64_t total_ns, uint64_t up_ns, uint64_t in, uint64_t out)
{
    mg_req_t r;
    memset(&r, 0, sizeof(r));
    r.route = rt;
    r.method = method;
    r.method_name = MG_STR("X");
    r.start_ns = uv_hrtime() - total_ns;
    r.upstream_ns = up_ns;
    r.body_received = in;
    r.bytes_out = out;
    mg_metrics_record(&r, status);
}

static void route_names_get_stable_series(void)
{
    unsigned a = mg_metrics_route_series("/users/*");
    unsigned b = mg_metrics_route_series("orders");
    CHECK_INT(a, >=, 2);
    CHECK_INT(b, >=, 2);
    CHECK_INT(a, !=, b);
    CHECK_INT(mg_metrics_route_series("/users/*"), ==, a);
    CHECK_INT(mg_metrics_route_series("orders"), ==, b);
}

static void requests_are_counted_by_route_method_and_class(void)
{
    mg_route_conf_t rt = {.name = "api"};
    rt.metrics_series = mg_metrics_route_series("api");
    mg_metrics_attach(3);
    mg_metrics_enable(1);
    record(&rt, HTTP_GET, 200, 2000000, 1000000, 0, 100); /* 2 ms */
    record(&rt, HTTP_GET, 204, 30000000, 0, 0, 50);       /* 30 ms */
    record(&rt, HTTP_POST, 503, 400000, 300000, 7, 10);   /* 0.4 ms */
    mg_metrics_attach(4); /* another shard: summed */
    record(&rt, 33 /* not in the fixed set */, 404, 0, 0, 0, 1);
    record(NULL, HTTP_DELETE, 499, 0, 0, 0, 0);
    mg_metrics_enable(0);
    record(&rt, HTTP_GET, 200, 0, 0, 0, 0); /* off: not counted */
    char *t = render();
    CHECK(has_line(t, "moongate_http_requests_total{route=\"api\",method="
                      "\"GET\",status=\"2xx\"} 2"));
    CHECK(has_line(t, "moongate_http_requests_total{route=\"api\",method="
                      "\"POST\",status=\"5xx\"} 1"));
    CHECK(has_line(t, "moongate_http_requests_total{route=\"api\",method="
                      "\"OTHER\",status=\"4xx\"} 1"));
    CHECK(has_line(t, "moongate_http_requests_total{route=\"(unmatched)\","
                      "method=\"DELETE\",status=\"4xx\"} 1"));
    /* Cumulative buckets: 0.4 ms, 2 ms, 30 ms and 0. */
    CHECK(has_line(t, "moongate_http_request_duration_seconds_bucket{route="
                      "\"api\",le=\"0.0005\"} 2"));
    CHECK(has_line(t, "moongate_http_request_duration_seconds_bucket{route="
                      "\"api\",le=\"0.0025\"} 3"));
    CHECK(has_line(t, "moongate_http_request_duration_seconds_bucket{route="
                      "\"api\",le=\"0.025\"} 3"));
    CHECK(has_line(t, "moongate_http_request_duration_seconds_bucket{route="
                      "\"api\",le=\"0.05\"} 4"));
    CHECK(has_line(t, "moongate_http_request_duration_seconds_bucket{route="
                      "\"api\",le=\"+Inf\"} 4"));
    CHECK(has_line(t, "moongate_http_request_duration_seconds_count{route="
                      "\"api\"} 4"));
    /* Only requests that went upstream are in the upstream histogram. */
    CHECK(has_line(t, "moongate_upstream_duration_seconds_count{route="
                      "\"api\"} 2"));
    CHECK(has_line(t, "moongate_upstream_duration_seconds_sum{route="
                      "\"api\"} 0.001300000"));
    CHECK(has_line(t, "moongate_http_received_bytes_total{route=\"api\"} 7"));
    CHECK(has_line(t, "moongate_http_sent_bytes_total{route=\"api\"} 161"));
    /* "(other)" is shown only once used. */
    CHECK(strstr(t, "(other)") == NULL);
    free(t);
}

static void master_figures_and_gauges_are_rendered(void)
{
    int s1 = mg_metrics_proc_acquire(), s2 = mg_metrics_proc_acquire();
    CHECK_INT(s1, !=, s2);
    mg_metrics_attach(s1);
    mg_metrics_set_connections(5);
    mg_metrics_add_generations(1);
    mg_metrics_attach(s2);
    mg_metrics_set_connections(2);
    mg_metrics_add_generations(2);
    mg_metrics_add_generations(-1);
    char *t = render();
    CHECK(has_line(t, "moongate_active_connections 7"));
    CHECK(has_line(t, "moongate_generations_alive 2"));
    CHECK(has_line(t, "moongate_workers 2"));
    CHECK(has_line(t, "moongate_worker_restarts_total 3"));
    CHECK(has_line(t, "moongate_config_reloads_total{result=\"success\"} 2"));
    CHECK(has_line(t, "moongate_config_reloads_total{result=\"failure\"} 1"));
    CHECK(has_line(t, "moongate_config_info{hash=\"abc\"} 1"));
    CHECK(has_line(t, "# TYPE moongate_http_request_duration_seconds "
                      "histogram"));
    free(t);
    /* A released slot (its worker died) reads zero again. */
    mg_metrics_proc_release(s1);
    t = render();
    CHECK(has_line(t, "moongate_active_connections 2"));
    CHECK(has_line(t, "moongate_generations_alive 1"));
    free(t);
    mg_metrics_proc_release(s2);
}

static void label_values_are_escaped(void)
{
    mg_route_conf_t rt = {.name = "a\"b\\c\nd"};
    rt.metrics_series = mg_metrics_route_series(rt.name);
    mg_metrics_enable(1);
    record(&rt, HTTP_GET, 200, 0, 0, 0, 0);
    mg_metrics_enable(0);
    char *t = render();
    CHECK(has_line(t, "moongate_http_requests_total{route=\"a\\\"b\\\\c\\nd\","
                      "method=\"GET\",status=\"2xx\"} 1"));
    free(t);
}

static void a_forked_worker_adds_to_the_same_counters(void)
{
    mg_route_conf_t rt = {.name = "forked"};
    pid_t pid = fork();
    if (pid == 0) {
        /* The child registers the name and counts: the parent sees both. */
        rt.metrics_series = mg_metrics_route_series("forked");
        mg_metrics_attach(7);
        mg_metrics_enable(1);
        for (int i = 0; i < 1000; i++)
            record(&rt, HTTP_PUT, 201, 0, 0, 1, 1);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    CHECK_INT(mg_metrics_route_series("forked"), >=, 2);
    char *t = render();
    CHECK(has_line(t, "moongate_http_requests_total{route=\"forked\","
                      "method=\"PUT\",status=\"2xx\"} 1000"));
    CHECK(has_line(t, "moongate_http_received_bytes_total{route=\"forked\"} "
                      "1000"));
    free(t);
}

static void overflowing_route_names_count_as_other(void)
{
    char name[32];
    unsigned last = 0;
    for (int i = 0; i < MG_METRICS_MAX_ROUTES + 10; i++) {
        snprintf(name, sizeof(name), "overflow-%d", i);
        last = mg_metrics_route_series(name);
    }
    CHECK_INT(last, ==, 1); /* "(other)" */
    mg_route_conf_t rt = {.name = "late", .metrics_series = last};
    mg_metrics_enable(1);
    record(&rt, HTTP_GET, 200, 0, 0, 0, 0);
    mg_metrics_enable(0);
    char *t = render();
    CHECK(has_line(t, "moongate_http_requests_total{route=\"(other)\","
                      "method=\"GET\",status=\"2xx\"} 1"));
    free(t);
}

static void plugin_counters_are_defined_once_and_rendered(void)
{
    int f = mg_ffi_metrics_define("team_x_total", "Xs.", "kind");
    CHECK_INT(f, >=, 0);
    CHECK_INT(mg_ffi_metrics_define("team_x_total", "Xs again.", "kind"), ==,
              f);
    CHECK_INT(mg_ffi_metrics_define("team_x_total", "Xs.", "other"), ==, -1);
    int a = mg_ffi_metrics_series(f, "kind=\"a\"");
    int b = mg_ffi_metrics_series(f, "kind=\"b\"");
    CHECK_INT(a, >=, 0);
    CHECK_INT(a, !=, b);
    CHECK_INT(mg_ffi_metrics_series(f, "kind=\"a\""), ==, a);
    mg_ffi_metrics_add(a, 3);
    mg_ffi_metrics_add(a, 4);
    mg_ffi_metrics_add(b, 1);
    mg_ffi_metrics_add(-1, 1);      /* ignored */
    mg_ffi_metrics_add(1 << 20, 1); /* ignored */
    int g = mg_ffi_metrics_define("team_plain_total", "Plain.", "");
    mg_ffi_metrics_add(mg_ffi_metrics_series(g, ""), 9);
    char *t = render();
    CHECK(has_line(t, "# HELP team_x_total Xs."));
    CHECK(has_line(t, "# TYPE team_x_total counter"));
    CHECK(has_line(t, "team_x_total{kind=\"a\"} 7"));
    CHECK(has_line(t, "team_x_total{kind=\"b\"} 1"));
    CHECK(has_line(t, "team_plain_total 9"));
    free(t);
}

int main(void)
{
    if (mg_metrics_init() != 0) {
        fprintf(stderr, "mg_metrics_init failed\n");
        return 1;
    }
    RUN(route_names_get_stable_series);
    RUN(requests_are_counted_by_route_method_and_class);
    RUN(master_figures_and_gauges_are_rendered);
    RUN(label_values_are_escaped);
    RUN(a_forked_worker_adds_to_the_same_counters);
    RUN(overflowing_route_names_count_as_other);
    RUN(plugin_counters_are_defined_once_and_rendered);
    UNIT_EXIT();
}
