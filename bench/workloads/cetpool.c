/* Benchmark workload: cetpool CALLS
 * Built -O2 -fcf-protection=full (every function starts with endbr64, as on Ubuntu and
 * Fedora). Waits for a line on stdin (a tracer attaching by pid), then gets and puts back
 * CALLS blocks through pool_get/pool_put (which a recipe probes); prints the loop's time. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void *volatile sink;

__attribute__((noinline)) void *pool_get(size_t n) { return malloc(n); }
__attribute__((noinline)) void pool_put(void *p) { free(p); }

int main(int argc, char **argv)
{
    long calls = argc > 1 ? atol(argv[1]) : 100000;
    char line[8];
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < calls; i++) {
        sink = pool_get(32);
        pool_put(sink);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
