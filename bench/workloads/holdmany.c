/* Benchmark workload: holdmany N
 * Keeps N 16-byte blocks live (from one stack, plus one array), says "held" on stderr, waits
 * for a line on stdin, then exits without freeing: the tracer then reports N live blocks. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static void *hold(void) { return malloc(16); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    void **blocks = calloc(n, sizeof(void *));
    for (long i = 0; i < n; i++)
        blocks[i] = hold();
    fprintf(stderr, "held %ld\n", n);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    return blocks[n - 1] == NULL;
}
