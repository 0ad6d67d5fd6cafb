"""--reachability: valgrind's leak kinds. scanner pauses the target at its exit (the tether
holds it) and classifies each live block by what points to it; heapscan reads the roots
(registers, stacks, data segments) and the heap graph. Takes a snapshot and a held process;
gives each block's kind. The target is always let go.
"""
