/* bench.calibrate's workload: functions whose first instruction is of one kind each, called
 * in a loop; argv: FUNCTION CALLS. Prints the loop's seconds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__asm__(
    ".text\n"
    ".globl op_push\n.type op_push,@function\nop_push:\n  push %rbx\n  pop %rbx\n  ret\n"
    ".globl op_jcc\n.type op_jcc,@function\nop_jcc:\n  je 1f\n1:\n  ret\n"
    ".globl op_nop\n.type op_nop,@function\nop_nop:\n  nop\n  ret\n"
    ".globl op_test\n.type op_test,@function\nop_test:\n  test %rdi,%rdi\n  je 1f\n1:\n  ret\n"
    ".globl op_mov\n.type op_mov,@function\nop_mov:\n  mov %rdi,%rax\n  ret\n"
    ".globl op_lea\n.type op_lea,@function\nop_lea:\n  lea 8(%rdi),%rax\n  ret\n"
    ".globl op_endbr\n.type op_endbr,@function\nop_endbr:\n  endbr64\n  push %rbp\n  pop %rbp\n  ret\n");

long op_push(long), op_jcc(long), op_nop(long), op_test(long), op_mov(long), op_lea(long), op_endbr(long);

int main(int argc, char **argv)
{
    static const struct { const char *name; long (*fn)(long); } ops[] = {
        {"op_push", op_push}, {"op_jcc", op_jcc}, {"op_nop", op_nop}, {"op_test", op_test},
        {"op_mov", op_mov}, {"op_lea", op_lea}, {"op_endbr", op_endbr}};
    if (argc < 3)
        return 2;
    long (*fn)(long) = 0;
    for (unsigned i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
        if (!strcmp(argv[1], ops[i].name))
            fn = ops[i].fn;
    if (!fn)
        return 2;
    long calls = atol(argv[2]), sum = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < calls; i++)
        sum += fn(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld\n%.6f\n", sum & 1, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
