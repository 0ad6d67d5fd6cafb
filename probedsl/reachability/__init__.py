"""--reachability: valgrind's leak kinds. scanner pauses the target at its exit (the tether
holds it) and classifies each live block by what points to it; heapscan reads the memory and
builds the heap graph, over the regions of its mappings (regions) and each thread's stack from
where it begins (stackroots: the exit path's caller, the red zone, stacks on the heap). Takes a
snapshot and a held process; gives each block's kind. tree keeps the kinds of every process
of a tree, each scanned at its own exit (the tether holds each child there). The target is always let go.
"""
