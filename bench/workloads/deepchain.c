/* Benchmark workload: deepchain DEPTH CALLS
 * Built -O2 (no frame pointers). Waits for a line on stdin (a tracer attaching by pid), then
 * does CALLS malloc/free pairs, each from DEPTH nested calls; prints the loop's wall time,
 * then ends when its stdin does (a tracer's counts can be read meanwhile). */
#include <stdlib.h>

#include "held_loop.h"

static void *volatile sink;

__attribute__((noinline)) void dive(int depth)
{
    if (depth > 1) {
        dive(depth - 1);
        __asm__ volatile("" ::: "memory");           /* no tail call: a real frame each */
        return;
    }
    void *p = malloc(64);
    sink = p;
    free(p);
}

int main(int argc, char **argv)
{
    int depth = argc > 1 ? atoi(argv[1]) : 10;
    long calls = argc > 2 ? atol(argv[2]) : 100000;
    if (!wait_for_tracer())
        return 1;
    struct timespec start = loop_start();
    for (long i = 0; i < calls; i++)
        dive(depth);
    print_loop_seconds(start);
    fflush(stdout);
    while (getchar() != EOF)
        ;
    return 0;
}
