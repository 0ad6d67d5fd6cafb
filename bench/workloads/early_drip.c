/* Allocates from its first moment: early_drip N keeps N 16-byte blocks from hold(), one
 * every millisecond, so a tracer that attaches late misses a countable number of them. */
#include <stdlib.h>
#include <unistd.h>

static void *volatile blocks[100000];

__attribute__((noinline)) void *hold(void) { return malloc(16); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    for (long i = 0; i < n && i < 100000; i++) {
        blocks[i] = hold();
        usleep(1000);
    }
    return 0;
}
