/* Benchmark workload: cetpool CALLS
 * Built -O2 -fcf-protection=full (every function starts with endbr64, as on Ubuntu and
 * Fedora). Waits for a line on stdin (a tracer attaching by pid), then gets and puts back
 * CALLS blocks through pool_get/pool_put (which a recipe probes); prints the loop's time. */
#include <stdlib.h>

#include "held_loop.h"

static void *volatile sink;

__attribute__((noinline)) void *pool_get(size_t n) { return malloc(n); }
__attribute__((noinline)) void pool_put(void *p) { free(p); }

int main(int argc, char **argv)
{
    long calls = argc > 1 ? atol(argv[1]) : 100000;
    if (!wait_for_tracer())
        return 1;
    struct timespec start = loop_start();
    for (long i = 0; i < calls; i++) {
        sink = pool_get(32);
        pool_put(sink);
    }
    print_loop_seconds(start);
    return 0;
}
