/* Benchmark workload: mallocfree THREADS CALLS DELAY_S
 * Sleeps DELAY_S (time for a tracer to attach by pid), then THREADS threads each do CALLS
 * malloc/free pairs; prints the loop's wall time in seconds. */
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
    sleep(argc > 3 ? atoi(argv[3]) : 0);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t t[64];
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, loop, 0);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
