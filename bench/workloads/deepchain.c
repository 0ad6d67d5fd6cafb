/* Benchmark workload: deepchain DEPTH CALLS
 * Built -O2 (no frame pointers). Waits for a line on stdin (a tracer attaching by pid), then
 * does CALLS malloc/free pairs, each from DEPTH nested calls; prints the loop's wall time. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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
    char line[8];
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < calls; i++)
        dive(depth);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
