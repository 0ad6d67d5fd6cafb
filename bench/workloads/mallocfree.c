/* Benchmark workload: mallocfree THREADS CALLS DELAY_S [held]
 * Sleeps DELAY_S (time for a tracer to attach by pid), then THREADS threads each do CALLS
 * malloc/free pairs; prints the loop's wall time in seconds. held: the loop starts when a byte
 * arrives on stdin, and the process exits when stdin closes (bench.prog_stats reads the
 * tracer's counts meanwhile). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long calls;
static void *volatile sink;

static void *loop(void *arg) {
    for (long i = 0; i < calls; i++) {
        void *p = malloc(64 + (i & 63));
        sink = p;
        free(p);
    }
    return arg;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    calls = argc > 2 ? atol(argv[2]) : 1000000;
    int held = argc > 4;
    char go;
    sleep(argc > 3 ? atoi(argv[3]) : 0);
    if (held && read(0, &go, 1) != 1)
        return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t t[64];
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, loop, 0);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    fflush(stdout);
    while (held && read(0, &go, 1) > 0)
        ;
    return 0;
}
