"""How stacks and the unwinder's rows are encoded in kernel maps: the numbers the BPF
generator writes into the program and the runtime reads back (probedsl.stacks.stacktrust,
probedsl.stacks.unwind_tables). A change here changes both sides at once."""

# marker "addresses" ending a stack, above every user address. BCC's unwinder (--stacks
# dwarf) ends each stack with one: COMPLETE, NO_UNWIND_INFO, DEPTH_LIMIT, or FP_WALK (it had
# no rows for the process yet and took the frame-pointer walk, to be cut there)
COMPLETE = 0xFFFF_FFFF_FFFF_FF00
NO_FRAME_POINTER = 0xFFFF_FFFF_FFFF_FF01
NO_UNWIND_INFO = 0xFFFF_FFFF_FFFF_FF02
DEPTH_LIMIT = 0xFFFF_FFFF_FFFF_FF03
FP_WALK = 0xFFFF_FFFF_FFFF_FF04
MARKERS = (COMPLETE, NO_FRAME_POINTER, NO_UNWIND_INFO, DEPTH_LIMIT, FP_WALK)

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
