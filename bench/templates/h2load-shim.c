/* LD_PRELOAD shim for h2load (nghttp2 1.52), built by bench/load.py into the run's work dir.
 *
 * Why: with `--h1 -H 'Connection: close'` h2load reconnects after every request, but it keeps
 * the SSL object when SSL_shutdown() returns 1, so every reconnect offers the previous session
 * and the server RESUMES it (TLS 1.3 PSK / TLS 1.2 ticket). To count FULL handshakes we make
 * SSL_shutdown() report 0: h2load then SSL_free()s the object and SSL_new()s a fresh one.
 *
 *   PEERBENCH_NORESUME=1   -> full handshake on every connection (default when preloaded)
 *   PEERBENCH_NORESUME=0   -> leave h2load's behaviour alone
 *   PEERBENCH_MAX_TLS=1.2  -> cap the client at TLS 1.2 (h2load has no such option)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

int SSL_shutdown(SSL *s) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_shutdown");
    int rv = real ? real(s) : 0;
    const char *e = getenv("PEERBENCH_NORESUME");
    if (e && strcmp(e, "0") == 0) return rv;
    return 0;
}

SSL *SSL_new(SSL_CTX *ctx) {
    static SSL *(*real)(SSL_CTX *);
    static long (*ctrl)(SSL *, int, long, void *);
    if (!real) real = (SSL *(*)(SSL_CTX *))dlsym(RTLD_NEXT, "SSL_new");
    if (!ctrl) ctrl = (long (*)(SSL *, int, long, void *))dlsym(RTLD_DEFAULT, "SSL_ctrl");
    SSL *s = real(ctx);
    const char *v = getenv("PEERBENCH_MAX_TLS");
    if (s && ctrl && v && strcmp(v, "1.2") == 0)
        ctrl(s, 124 /* SSL_CTRL_SET_MAX_PROTO_VERSION */, 0x0303 /* TLS1_2_VERSION */, NULL);
    return s;
}
