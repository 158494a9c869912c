/*
 * The command line: run the gateway, check a config, signal a running
 * gateway, print the version. Everything else lives in the modules.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "explain.h"
#include "generation.h"
#include "lua.h"
#include "log.h"
#include "master.h"

#define DEFAULT_CONFIG "conf/moongate.lua"

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: moongate [-c FILE]          run the gateway\n"
        "       moongate check [-c FILE]    validate a config\n"
        "       moongate reload [-c FILE]   reload a running gateway\n"
        "       moongate stop [-c FILE]     stop a running gateway "
        "gracefully\n"
        "       moongate lua FILE [ARGS]    run a Lua script with the gw "
        "API\n"
        "       moongate explain [-c FILE] METHOD URL [-H 'Name: value']...\n"
        "                                   show the route, plugins and "
        "upstream\n"
        "                                   a request would meet\n"
        "       moongate version\n"
        "FILE defaults to " DEFAULT_CONFIG ".\n");
}

/* Loads and fully validates a config; prints every error to stderr. */
static mg_config_t *load(const char *path)
{
    static char err[65536];
    mg_config_t *cfg;
    if (mg_config_load(path, &cfg, err, sizeof(err))) {
        fprintf(stderr, "%s%s", err,
                err[0] && err[strlen(err) - 1] == '\n' ? "" : "\n");
        return NULL;
    }
    if (mg_gen_check(cfg, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        mg_config_free(cfg);
        return NULL;
    }
    return cfg;
}

static int check(const char *path)
{
    mg_config_t *cfg = load(path);
    if (!cfg)
        return 1;
    printf("%s: ok: %zu routes, %zu upstreams, %u workers, listen", path,
           cfg->nroutes, cfg->nupstreams, cfg->workers);
    for (size_t i = 0; i < cfg->nlisten; i++)
        printf(" %s", cfg->listen[i].text);
    if (cfg->admin.listen.text)
        printf(", admin %s%s", cfg->admin.listen.text,
               cfg->admin.token ? " (token)" : "");
    printf("\n");
    for (size_t i = 0; i < cfg->nroutes; i++) {
        const mg_route_conf_t *rt = &cfg->routes[i];
        printf("  route %-24s -> %s\n", rt->path,
               rt->upstream >= 0 ? cfg->upstreams[rt->upstream].name
                                 : "(handler)");
    }
    mg_config_free(cfg);
    return 0;
}

static int signal_master(const char *path, int sig)
{
    mg_config_t *cfg = load(path);
    if (!cfg)
        return 1;
    FILE *f = fopen(cfg->pid_file, "r");
    int pid = 0;
    if (!f || fscanf(f, "%d", &pid) != 1 || pid <= 0) {
        fprintf(stderr, "moongate: cannot read pid file %s: %s\n",
                cfg->pid_file, f ? "no pid in it" : strerror(errno));
        if (f)
            fclose(f);
        mg_config_free(cfg);
        return 1;
    }
    fclose(f);
    mg_config_free(cfg);
    if (kill(pid, sig) < 0) {
        fprintf(stderr, "moongate: cannot signal pid %d: %s\n", pid,
                strerror(errno));
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmd = "run", *path = DEFAULT_CONFIG;
    int i = 1;
    if (i < argc && argv[i][0] != '-')
        cmd = argv[i++];
    if (strcmp(cmd, "lua") == 0) {
        if (i >= argc) {
            usage(stderr);
            return 2;
        }
        signal(SIGPIPE, SIG_IGN);
        return mg_lua_run_script(argv[i], argc - i - 1, argv + i + 1);
    }
    if (strcmp(cmd, "explain") == 0) {
        /* -c may come anywhere; everything else is the request. */
        char **rest = calloc((size_t)argc + 1, sizeof(char *));
        int n = 0;
        for (; i < argc; i++) {
            if (strcmp(argv[i], "-c") == 0 && i + 1 < argc)
                path = argv[++i];
            else if (strcmp(argv[i], "-H") == 0 && i + 1 < argc) {
                rest[n++] = argv[i++];
                rest[n++] = argv[i];
            } else
                rest[n++] = argv[i];
        }
        signal(SIGPIPE, SIG_IGN);
        mg_config_t *cfg = load(path);
        int rc = cfg ? mg_explain_run(cfg, n, rest) : 2;
        mg_config_free(cfg);
        free(rest);
        return rc;
    }
    for (; i < argc; i++) {
        if (strcmp(argv[i], "-c") == 0 && i + 1 < argc) {
            path = argv[++i];
        } else if (strcmp(argv[i], "-h") == 0
                   || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "moongate: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(cmd, "version") == 0) {
        printf("moongate %s\n", MG_VERSION);
        return 0;
    }
    if (strcmp(cmd, "check") == 0)
        return check(path);
    if (strcmp(cmd, "reload") == 0)
        return signal_master(path, SIGHUP);
    if (strcmp(cmd, "stop") == 0)
        return signal_master(path, SIGTERM);
    if (strcmp(cmd, "run") != 0) {
        fprintf(stderr, "moongate: unknown command '%s'\n", cmd);
        usage(stderr);
        return 2;
    }
    mg_config_t *cfg = load(path);
    if (!cfg)
        return 1;
    if (mg_log_init(cfg->error_log, cfg->log_level, "master") < 0) {
        fprintf(stderr, "moongate: cannot open error log %s: %s\n",
                cfg->error_log, strerror(errno));
        mg_config_free(cfg);
        return 1;
    }
    return mg_master_run(path, cfg);
}
