/* Allocation microbenchmark for `cargo xtask bench`: waits for a line on
 * stdin (so a profiler can attach first), then each of T threads runs N
 * rounds of mixed malloc / calloc / realloc / free with sizes from 64 B to
 * 4 KiB, D calls deep (default 0: straight from the thread's function), and
 * it prints the elapsed nanoseconds. Usage: loop N T [D] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long rounds;
static int depth;

__attribute__((noinline)) static void *run(void *arg) {
    unsigned long x = (unsigned long)arg * 2654435761u + 1;
    for (long i = 0; i < rounds; i++) {
        x = x * 6364136223846793005ul + 1442695040888963407ul;
        size_t n = 64 + ((x >> 33) & 4095);
        void *p;
        switch (i & 7) {
        case 0: p = calloc(1, n); break;
        case 1: p = realloc(malloc(n / 2), n); break;
        default: p = malloc(n); break;
        }
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
    return NULL;
}

/* D frames between the thread's start and the loop (not a tail call). */
__attribute__((noinline)) static void *descend(int d, void *arg) {
    void *r = d > 0 ? descend(d - 1, arg) : run(arg);
    __asm__ volatile("" : : "r"(r) : "memory");
    return r;
}

static void *work(void *arg) { return descend(depth, arg); }

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 1000000;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    depth = argc > 3 ? atoi(argv[3]) : 0;
    char line[16];
    struct timespec a, b;
    pthread_t t[64];
    if (threads < 1 || threads > 64) return 2;
    if (!fgets(line, sizeof line, stdin)) return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, work, (void *)(long)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
