/* The demo service of `cargo xtask demo`: it "handles requests" forever.
 * Each request allocates a buffer it frees (transient), keeps a parsed
 * header in a bounded ring (stable), and leaks a session record into a cache
 * that is never trimmed (the leak heapbpf should point at). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define RING 64

struct session { char id[32]; char payload[4064]; struct session *next; };

static struct session *cache;
static char *ring[RING];

NOINLINE static void *read_request(void) { return malloc(16384); }
NOINLINE static char *parse_header(const char *req) { (void)req; return strdup("GET /api/items HTTP/1.1"); }
NOINLINE static void remember_session(int n) {
    struct session *s = malloc(sizeof *s);
    snprintf(s->id, sizeof s->id, "session-%d", n);
    memset(s->payload, n & 0xff, sizeof s->payload);
    s->next = cache;
    cache = s;
}
NOINLINE static void handle_request(int n) {
    void *req = read_request();
    free(ring[n % RING]);
    ring[n % RING] = parse_header(req);
    remember_session(n);
    free(req);
}

int main(void) {
    printf("leaky: pid %d, handling requests\n", (int)getpid());
    fflush(stdout);
    for (int n = 0;; n++) {
        handle_request(n);
        usleep(2000);
    }
}
