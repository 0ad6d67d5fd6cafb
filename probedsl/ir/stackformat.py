"""How stacks and the unwinder's rows are encoded in kernel maps: the numbers the BPF
generator writes into the program and the runtime reads back (probedsl.stacks.stacktrust,
probedsl.stacks.unwind_tables). A change here changes both sides at once."""

# marker "addresses" ending a stack, above every user address. BCC's unwinder (--stacks
# dwarf) ends each stack with one: COMPLETE, NO_UNWIND_INFO, DEPTH_LIMIT, or FP_WALK (it had
# no rows for the process yet and took the frame-pointer walk, to be cut there); BCC's own
# frame-pointer walk (--stacks fp) ends each with FP_WALK
COMPLETE = 0xFFFF_FFFF_FFFF_FF00
NO_FRAME_POINTER = 0xFFFF_FFFF_FFFF_FF01
NO_UNWIND_INFO = 0xFFFF_FFFF_FFFF_FF02
DEPTH_LIMIT = 0xFFFF_FFFF_FFFF_FF03
FP_WALK = 0xFFFF_FFFF_FFFF_FF04
MARKERS = (COMPLETE, NO_FRAME_POINTER, NO_UNWIND_INFO, DEPTH_LIMIT, FP_WALK)
# a stack kept by its hash (BCC's probedsl_ustacks: the unwinder's, and the frame-pointer walks
# of uretprobes) has an id from here up; below it, an id in the kernel's stack table
HASHED_ID = 1 << 62

# row kinds, as the BPF program reads them
INVALID, CFA_RSP, CFA_RBP, OUTERMOST, SIGNAL, PLT = 0, 1, 2, 3, 4, 5
RBP_SAME, RBP_AT_CFA = 0, 1
ROW_KINDS = (INVALID, CFA_RSP, CFA_RBP, OUTERMOST, SIGNAL, PLT)
MAX_MAPS = 64  # executable mappings per process the unwinder can search
ROWS = 1 << 21  # rows in the kernel table (16 B each: 32 MB)
PROCESSES = 8192  # processes with mappings at once (least recently used go first)
CHUNK_SHIFT = 18  # the address space in 256 KB chunks, each naming its mappings
PER_CHUNK = 8  # mappings one chunk can name (small libraries sit side by side)
CHUNKS = 1 << 18
ANCESTORS = 4  # a new child without its entry unwinds with the nearest of these that has one
RETURNS = 1 << 16  # return addresses replaced by pending uretprobes, kept at entry

# Python frames (probedsl.stacks.pyframes): what the BPF walk records per stack
PY_FRAMES = 32  # Python frames kept per stack (innermost first)
PY_THREADS = 64  # thread states searched for a thread's own
PY_PROCESSES = 1024  # CPython processes walked at once
PY_THREADS_KNOWN = 16384  # threads whose thread state is remembered
PY_ENTRY_SHIFT = 40  # where a frame's record puts its entry byte
PY_TRUNCATED = 1 << 33  # flag on the last frame kept: the chain went on
PY_FRAME_READ = 80  # bytes of a frame header read whole (the largest, 3.14's)
