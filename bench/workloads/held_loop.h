/* What the held benchmark workloads share (bench/held.py drives them): wait for a line on
 * stdin (the tracer attaching by pid), then time the loop and print its seconds. */
#include <stdio.h>
#include <time.h>

static int wait_for_tracer(void)
{
    char line[8];
    return fgets(line, sizeof(line), stdin) != NULL;
}

static struct timespec loop_start(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t;
}

static void print_loop_seconds(struct timespec start)
{
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("%.6f\n", (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9);
}
