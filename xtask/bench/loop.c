/* malloc/free loop for `cargo xtask bench`: waits for a line on stdin (so a
 * profiler can attach first), runs N pairs, prints the elapsed nanoseconds. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) static void *alloc_one(size_t n) { return malloc(n); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    char line[16];
    struct timespec a, b;
    if (!fgets(line, sizeof line, stdin)) return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        void *p = alloc_one(64 + (i & 255));
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
