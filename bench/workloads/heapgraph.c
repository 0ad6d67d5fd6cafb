/* A heap for --reachability to scan: TOTAL_MB megabytes in blocks of BLOCK bytes. Each block
 * starts with a pointer to the block before it (a linked list from a global head) and one
 * into the middle of a random earlier block; the rest holds random words, as data does. One
 * block in ten is cut out of the list (lost). It builds all that after reading a line from
 * stdin, says "ready", and exits after another line (where probedsl scans it).
 *   heapgraph TOTAL_MB BLOCK */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct block { struct block *prev; char *inside; uint64_t data[]; };
static struct block *volatile head;

int main(int argc, char **argv) {
    size_t total = (size_t)atol(argv[1]) << 20, size = (size_t)atol(argv[2]);
    size_t count = total / size, words = (size - 16) / 8;
    struct block **all = malloc(count * sizeof *all);
    uint64_t x = 88172645463325252ull;
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (size_t i = 0; i < count; i++) {
        struct block *b = malloc(size);
        b->prev = head;
        b->inside = i ? (char *)all[x % i] + size / 2 : 0;
        for (size_t w = 0; w < words; w++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            b->data[w] = x;
        }
        all[i] = b;
        head = b;
        if (i % 10 == 9)                       /* lose the block before this one */
            b->prev = b->prev->prev;
    }
    for (size_t i = 0; i < count; i++)         /* only the list and the inside pointers remain */
        all[i] = 0;
    free(all);
    puts("ready");
    fflush(stdout);
    fgets(line, sizeof line, stdin);
    exit(0);
}
