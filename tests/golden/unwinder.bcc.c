// probedsl unwinder: begin (backends/templates/bcc_unwinder.c.j2, its golden tests/golden/unwinder.bcc.c)
// --stacks dwarf: user stacks unwound here from call-frame rows (probedsl/stacks/unwind_tables.py
// writes them): at each frame the row in force gives the caller's frame address (CFA) from
// rsp or rbp, the return address sits at CFA-8, and rbp is reloaded where it was saved.
#define PROBEDSL_UNW_MAPS 64
struct probedsl_unw_map_t { u64 start; u64 end; u64 bias; u32 first; u32 count; };
struct probedsl_unw_maps_t { u32 n; u32 pad; struct probedsl_unw_map_t m[PROBEDSL_UNW_MAPS]; };
struct probedsl_unw_row_t { u32 pc; u8 kind; u8 rbp_kind; s16 rbp_off; s32 cfa_off; u32 pad; };
BPF_TABLE("lru_hash", u32, struct probedsl_unw_maps_t, probedsl_unw_maps, 8192);
// (pid, address >> 18) -> the mappings overlapping that chunk of the address
// space: one lookup finds a frame's mapping (a search over the mappings cost the verifier
// ~0.5 s per program)
struct probedsl_unw_chunk_key_t { u32 pid; u32 pad; u64 chunk; };
struct probedsl_unw_chunk_t { u8 slot[8]; };
BPF_TABLE("lru_hash", struct probedsl_unw_chunk_key_t, struct probedsl_unw_chunk_t, probedsl_unw_chunks, 262144);
BPF_ARRAY(probedsl_unw_rows, struct probedsl_unw_row_t, 2097152);
// a traced process's children (a thread too), kept until they exec or end: child -> parent
BPF_TABLE("lru_hash", u32, u32, probedsl_unw_parents, 65536);
// the walk's scratch: twice the frames, so that the marker's index, masked, is in bounds; then
// where the walk stands, from one run of the frames program to the next
struct probedsl_unw_scratch_t {
    u64 ip[128];
    u64 next_ip, sp, bp, back, hash, end;   // end: the marker, 0 while frames remain to walk
    u32 n, pid, self, map;                  // pid: whose rows; map: 1 while cur is the last frame's mapping
                                            // (a flag: with cur.end 0 for none the verifier walked 2x the states)
    struct probedsl_unw_map_t cur;          // (kept here, a run need not look up the mappings)
    u64 last_id;                            // the stack this CPU stored last (a loop's, stored once)
    u64 win_base;                           // the copy of the stack from win_base, win_len bytes
    u32 win_len, win_pad;
    u8 win[1024 + 8];   // (+ 8: a word at any offset below the size is in bounds)
};
BPF_PERCPU_ARRAY(probedsl_unw_scratch, struct probedsl_unw_scratch_t, 1);
// set while a walk uses this CPU's scratch: a uprobe's program can be preempted, and another
// program on the same CPU then gets no stack (counted as one without) rather than garbling it.
// An acquire program sets it as it defers its first entry (the resource's _defer_entry), and
// the unwinder clears it once it stored them (or the acquire program, its tail call failing).
BPF_PERCPU_ARRAY(probedsl_unw_busy, u32, 1);
// The unwinder is two programs per program type, each verified once (and each resource's
// unstacked program, from slot 2: entries stored without a stack): every acquire program
// tail-calls the first (a tail call keeps the context: the registers to start from), which
// starts the walk and tail-calls the second; it walks 4 frames and tail-calls itself
// until the stack ends, then stores it. The verifier walks a loop's every iteration, and
// walking all 64 frames in one program cost it ~280,000 instructions (0.3 s).
#define PROBEDSL_UNW_FRAMES_PROGRAM 1
BPF_PROG_ARRAY(probedsl_unwinders, 3);   // then each resource's unstacked program

// Python frames (probedsl/stacks/pyframes.py): at each walk, the thread's CPython frame chain, found
// from its PyThreadState (looked up once per thread in the interpreter's thread list by
// native thread id, then checked at each use), innermost first: (code object, instruction
// pointer - code object, the frame's entry byte) per frame. The loader writes one entry per CPython process.
#define PROBEDSL_PY_FRAMES 32
#define PROBEDSL_PY_THREADS 64
struct probedsl_py_proc_t {
    u64 interp_head;            // &_PyRuntime.interpreters.head
    u16 threads_head, tstate_next, native_tid, tstate_frame, cframe_frame, frame_code, frame_previous,
        frame_instr, frame_entry, entry_is_owner, code_tag_bits, pad;
};
BPF_HASH(probedsl_py_procs, u32, struct probedsl_py_proc_t, 1024);
struct probedsl_pystack_t { u32 pid; u32 n; u64 code[PROBEDSL_PY_FRAMES]; u64 meta[PROBEDSL_PY_FRAMES]; };
// the walk's scratch: the record, then a copy of the memory below a frame's header's end
// (fields at the offsets of the process's version, masked into the copy). A thread's frames
// lie one after another in its data stack (3.11+), each caller below the frame it called, so
// one read (~77 ns whatever its size up to a page) finds several frames' headers there.
struct probedsl_py_scratch_t {
    struct probedsl_pystack_t rec;
    u64 win_base;
    u32 win_len, pad;
    u8 win[1024 + 8];   // (+ 8: a word at any offset below the size is in bounds)
};
BPF_PERCPU_ARRAY(probedsl_py_scratch, struct probedsl_py_scratch_t, 1);
BPF_HASH(probedsl_pystacks, u64, struct probedsl_pystack_t, 131072);
BPF_TABLE("lru_hash", u32, u64, probedsl_py_tstates, 16384);
// a new Python stack's id: the loader names its code objects at once (a code object can be
// freed soon after: the __main__ module's is, as its run ends)
BPF_RINGBUF_OUTPUT(probedsl_py_doorbell, 16);

#ifndef PROBEDSL_TABLES_ONLY
static __always_inline u64 probedsl_py_u64(u64 address)
{
    u64 value = 0;
    probedsl_read_user(&value, sizeof(value), (void *)address);
    return value;
}

// a field of the frame whose header is at offset at of the copy (at + 80 <= the copy's length)
static __always_inline u64 probedsl_py_field(struct probedsl_py_scratch_t *s, u64 at, u16 off)
{
    u64 value;
    __builtin_memcpy(&value, &s->win[(at + off) & (1024 - 1)], sizeof(value));
    return value;
}

// where frame's header lies in the scratch's copy, copied now if it is not there: the copy
// ends with the header and starts no lower than the header's page (the page below may not be
// mapped, and a read that faults costs ~1 us)
static __always_inline int probedsl_py_copy(struct probedsl_py_scratch_t *s, u64 frame, u64 *at)
{
    *at = frame - s->win_base;
    if (*at < s->win_len && s->win_len - *at >= 80) return 0;
    u32 len = (frame & 4095) + 80;
    if (len > 1024) len = 1024;
    if (probedsl_read_user(s->win, len, (void *)(frame + 80 - len))) return -1;
    s->win_base = frame + 80 - len;
    s->win_len = len;
    *at = len - 80;
    return 0;
}

// the record of this thread's Python frames (its frames and the pid folded into *hash), or 0.
// The pid: forked workers share addresses, so one native stack and one code object address in
// two of them can be two different functions, named from each one's own memory
static __always_inline struct probedsl_pystack_t *probedsl_py_walk(u32 pid, u64 *hash)
{
    struct probedsl_py_proc_t *cfg = probedsl_py_procs.lookup(&pid);
    if (!cfg) return 0;
    u32 zero = 0;
    struct probedsl_py_scratch_t *s = probedsl_py_scratch.lookup(&zero);
    if (!s) return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 tstate = 0;
    u64 *known = probedsl_py_tstates.lookup(&tid);
    if (known && (u32)probedsl_py_u64(*known + cfg->native_tid) == tid) {
        tstate = *known;
    } else {
        u64 interp = probedsl_py_u64(cfg->interp_head);
        u64 t = interp ? probedsl_py_u64(interp + cfg->threads_head) : 0;
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < PROBEDSL_PY_THREADS; i++) {
            PROBEDSL_OPAQUE(i);
            if (!t || i >= PROBEDSL_PY_THREADS) break;
            if ((u32)probedsl_py_u64(t + cfg->native_tid) == tid) { tstate = t; break; }
            t = probedsl_py_u64(t + cfg->tstate_next);
        }
        if (!tstate) return 0;          // a thread that never ran Python: native frames only
        probedsl_py_tstates.update(&tid, &tstate);
    }
    u64 frame = probedsl_py_u64(tstate + cfg->tstate_frame);
    if (cfg->cframe_frame != 0xffff && frame)
        frame = probedsl_py_u64(frame + cfg->cframe_frame);
    u64 tags = cfg->code_tag_bits, h = *hash, at = 0;
    u32 n = 0;
    s->win_len = 0;
    // branch-free per frame (the verifier follows each branch of each iteration): the entry
    // byte goes to user space raw, which knows what it means in that version
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PROBEDSL_PY_FRAMES; i++) {
        PROBEDSL_OPAQUE(i);
        if (!frame || i >= PROBEDSL_PY_FRAMES) break;
        if (probedsl_py_copy(s, frame, &at)) break;
        u64 code = probedsl_py_field(s, at, cfg->frame_code) & ~tags;
        u64 meta = ((probedsl_py_field(s, at, cfg->frame_instr) - code) & 0xffffffffULL) |
            ((u64)s->win[(at + cfg->frame_entry) & (1024 - 1)] << 40);
        frame = probedsl_py_field(s, at, cfg->frame_previous);
        s->rec.code[i & (PROBEDSL_PY_FRAMES - 1)] = code;
        s->rec.meta[i & (PROBEDSL_PY_FRAMES - 1)] = meta;
        h = (h ^ code) * 0x100000001b3ULL;
        h = (h ^ meta) * 0x100000001b3ULL;
        n = i + 1;
    }
    if (!n) return 0;
    if (frame && n >= PROBEDSL_PY_FRAMES)
        s->rec.meta[(PROBEDSL_PY_FRAMES - 1)] |= 0x200000000ULL;
    *hash = (h ^ pid) * 0x100000001b3ULL;
    s->rec.pid = pid;
    s->rec.n = n;
    return &s->rec;
}
#endif

// start a walk in this CPU's scratch at regs, the user registers (ctx itself in a uprobe)
#ifndef PROBEDSL_TABLES_ONLY
static __always_inline int probedsl_unw_begin(struct pt_regs *regs)
{
    u32 zero = 0;
    struct probedsl_unw_scratch_t *st = probedsl_unw_scratch.lookup(&zero);
    if (!st) return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    st->self = pid;
    struct probedsl_unw_maps_t *maps = probedsl_unw_maps.lookup(&pid);
    // a child that has not exec'd, before the loader wrote its entry (it does at the fork's
    // record): its address space is a copy of its parent's, and so are the rows (the
    // parent's, or a grandparent's when the parent is such a child too: a shell's subshells)
    u32 *parent = 0;
    if (!maps && (parent = probedsl_unw_parents.lookup(&pid))) {
        pid = *parent;
        maps = probedsl_unw_maps.lookup(&pid);
    }
    if (!maps && (parent = probedsl_unw_parents.lookup(&pid))) {
        pid = *parent;
        maps = probedsl_unw_maps.lookup(&pid);
    }
    if (!maps && (parent = probedsl_unw_parents.lookup(&pid))) {
        pid = *parent;
        maps = probedsl_unw_maps.lookup(&pid);
    }
    if (!maps && (parent = probedsl_unw_parents.lookup(&pid))) {
        pid = *parent;
        maps = probedsl_unw_maps.lookup(&pid);
    }
    st->pid = pid;
    st->next_ip = PT_REGS_IP(regs);
    st->sp = PT_REGS_SP(regs);
    st->bp = PT_REGS_FP(regs);
    st->back = 0;
    st->hash = 0xcbf29ce484222325ULL;
    st->n = 0;
    st->map = 0;
    st->win_len = 0;
    st->end = maps ? 0 : 0xffffffffffffff02ULL;     // no rows for this process yet: no frames
    return 1;
}

// the stack's word at addr, from the scratch's copy of the stack: a read of user memory costs
// ~77 ns whatever its size up to a page, so one copy serves many frames. Copied again where
// the walk leaves it: from sp, the frame's lowest address (in a large frame, from just below
// the word), to the end of the word's page at most (the stack's last page may be followed by
// none, and a read that faults costs ~1 us).
static __always_inline int probedsl_unw_peek(struct probedsl_unw_scratch_t *st, u64 sp, u64 addr, u64 *out)
{
    u64 off = addr - st->win_base;
    if (off >= st->win_len || st->win_len - off < 8) {
        u64 base = addr - sp <= 1024 - 64 ? sp : addr - 56;
        u64 len = ((addr + 8 + 4095) & ~4095ULL) - base;
        if (len > 1024) len = 1024;
        if (probedsl_read_user(st->win, len, (void *)base)) {
            st->win_len = 0;
            return probedsl_read_user(out, 8, (void *)addr);
        }
        st->win_base = base;
        st->win_len = len;
        off = addr - base;
        if (off >= len || len - off < 8) return probedsl_read_user(out, 8, (void *)addr);
    }
    *out = *(u64 *)(st->win + (off & (1024 - 1)));
    return 0;
}

// walk up to 4 more frames of the scratch's stack
static __always_inline void probedsl_unw_frames(struct probedsl_unw_scratch_t *st)
{
    u32 pid = st->pid;
    struct probedsl_unw_maps_t *maps = 0;         // looked up where a frame leaves the mapping before
    u64 ip = st->next_ip, sp = st->sp, bp = st->bp, back = st->back, hash = st->hash, end = 0;
    u32 n = st->n, known = st->map;
    u64 m_start = st->cur.start, m_end = st->cur.end, m_bias = st->cur.bias;   // the frame before's mapping
    u32 m_first = st->cur.first, m_count = st->cur.count;
#pragma clang loop unroll(disable)
    for (u32 k = 0; k < 4; k++) {
        u32 i = n;
        PROBEDSL_OPAQUE(i);
        if (i >= 64) { end = 0xffffffffffffff03ULL; break; }
        st->ip[i & 63] = ip;
        hash = (hash ^ ip) * 0x100000001b3ULL;   // FNV-1a over the frames, then the marker
        n = i + 1;
        u64 pc = ip - back;               // a return address: its call is the byte before
        if (!known || pc < m_start || pc >= m_end) {   // most frames stay in the last module
            if (!maps) maps = probedsl_unw_maps.lookup(&pid);
            if (!maps) { end = 0xffffffffffffff02ULL; break; }   // evicted meanwhile
            struct probedsl_unw_chunk_key_t ck = {.pid = pid, .chunk = pc >> 18};
            struct probedsl_unw_chunk_t *chunk = probedsl_unw_chunks.lookup(&ck);
            if (!chunk) { end = 0xffffffffffffff02ULL; break; }
            known = 0;
#pragma unroll
            for (u32 j = 0; j < 8; j++) {
                u8 slot = chunk->slot[j];
                if (slot) {               // slots count from 1
                    struct probedsl_unw_map_t *c = &maps->m[(slot - 1) & (PROBEDSL_UNW_MAPS - 1)];
                    if (c->start <= pc && pc < c->end) {
                        m_start = c->start; m_end = c->end; m_bias = c->bias;
                        m_first = c->first; m_count = c->count;
                        known = 1;
                    }
                }
            }
            if (!known) { end = 0xffffffffffffff02ULL; break; }
        }
        u64 rel = pc - m_bias;
        u32 first = m_first, rows = m_count;
#pragma clang loop unroll(disable)
        for (u32 s = 0; s < 22; s++) {
            if (rows <= 1) break;
            u32 half = rows / 2, mid = first + half;
            struct probedsl_unw_row_t *r = probedsl_unw_rows.lookup(&mid);
            if (!r) break;
            if (r->pc <= rel) { first = mid; rows -= half; } else rows = half;
        }
        struct probedsl_unw_row_t *row = probedsl_unw_rows.lookup(&first);
        if (!row || row->pc > rel || row->kind == 0) { end = 0xffffffffffffff02ULL; break; }
        if (row->kind == 3) { end = 0xffffffffffffff00ULL; break; }
        u64 ra = 0, cfa;
        if (row->kind == 4) {
            // a signal handler's return trampoline: the interrupted registers are in the
            // ucontext at sp (uc_mcontext at +40: rbp, rsp, rip of gregs)
            if (probedsl_read_user(&bp, 8, (void *)(sp + 0x78)) ||
                probedsl_read_user(&cfa, 8, (void *)(sp + 0xa0)) ||
                probedsl_read_user(&ra, 8, (void *)(sp + 0xa8))) { end = 0xffffffffffffff02ULL; break; }
            if (!ra) { end = 0xffffffffffffff00ULL; break; }
            sp = cfa; ip = ra; back = 0;          // the interrupted instruction itself
            continue;
        }
        if (row->kind == 5)          // a PLT stub (the thread stopped in it): 16 once it pushed
            cfa = sp + ((ip & 15) >= row->cfa_off ? 16 : 8);
        else
            cfa = (row->kind == 2 ? bp : sp) + row->cfa_off;
        if (probedsl_unw_peek(st, sp, cfa - 8, &ra)) { end = 0xffffffffffffff02ULL; break; }
        if (row->rbp_kind == 1 && probedsl_unw_peek(st, sp, cfa + row->rbp_off, &bp)) {
            end = 0xffffffffffffff02ULL;
            break;
        }
        if (!ra) { end = 0xffffffffffffff00ULL; break; }
        if (cfa <= sp) { end = 0xffffffffffffff02ULL; break; }   // a caller's frame lies above
        sp = cfa; ip = ra; back = 1;
    }
    if (!end && n >= 64) end = 0xffffffffffffff03ULL;   // (not one more run to find out)
    st->next_ip = ip;
    st->sp = sp;
    st->bp = bp;
    st->back = back;
    st->hash = hash;
    st->n = n;
    st->map = known;
    st->cur.start = m_start; st->cur.end = m_end; st->cur.bias = m_bias;
    st->cur.first = m_first; st->cur.count = m_count;
    st->end = end;
}

// end the scratch's stack with its marker and store it: its id, or -1
static __always_inline s64 probedsl_unw_store(void *ctx)
{
    u32 zero = 0;
    struct probedsl_unw_scratch_t *st = probedsl_unw_scratch.lookup(&zero);
    if (!st) return -1;
    u64 hash = st->hash, end = st->end;
    u32 n = st->n;
    if (!end) end = 0xffffffffffffff03ULL;     // (the tail calls ran out first)
    if (n <= 1 && end == 0xffffffffffffff02ULL) {
        // no rows for this process yet (it just started or exec'd), or none for where it
        // stopped: the frame-pointer walk, which the report cuts where it stops being certain
        long got = bpf_get_stack(ctx, st->ip, sizeof(u64) * 64, BPF_F_USER_STACK);
        n = got > 0 ? got / sizeof(u64) : 0;
        end = 0xffffffffffffff04ULL;
        hash = 0xcbf29ce484222325ULL;
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < 64; i++) {
            PROBEDSL_OPAQUE(i);
            if (i >= n || i >= 64) break;
            hash = (hash ^ st->ip[i & 63]) * 0x100000001b3ULL;
        }
    }
    // the marker ends the stack: what lies after it in the scratch is stale, and never read
    PROBEDSL_OPAQUE(n);
    st->ip[n & 127] = end;
    hash = (hash ^ end) * 0x100000001b3ULL;
    struct probedsl_pystack_t *py = probedsl_py_walk(st->self, &hash);   // the process's own Python frames
    u64 id = hash >> 2 | 0x4000000000000000ULL;   // past the stack table's ids; non-negative (a negative id is no stack)
    if (id != st->last_id) {   // (the table's entries stay to the end of the run)
        long err = probedsl_ustacks.insert(&id, (struct probedsl_ustack_t *)st);
        if (err && err != -17)   // (-EEXIST: stored before, or by another CPU meanwhile)
            return -1;           // the table is full: no stack
        st->last_id = id;
    }
    if (py && !probedsl_pystacks.insert(&id, py))
        probedsl_py_doorbell.ringbuf_output(&id, sizeof(id), 0);
    return id;
}

static __always_inline void probedsl_unw_release(void)
{
    u32 zero = 0;
    u32 *busy = probedsl_unw_busy.lookup(&zero);
    if (busy) *busy = 0;
}

// in a system call's tracepoint: the user registers the task entered the kernel with
static __always_inline int probedsl_unw_begin_syscall(void)
{
    struct pt_regs regs = {};
    bpf_probe_read_kernel(&regs, sizeof(regs), (void *)bpf_task_pt_regs(bpf_get_current_task_btf()));
    return probedsl_unw_begin(&regs);
}
#endif
// probedsl unwinder: end
