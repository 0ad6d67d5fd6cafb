"""What probedsl trusts from input others wrote (docs/security.md): names escaped per output
(escape), reads bounded per file (bounds), caches trusted only when owned by the running user
and writable by no one else (cachedir).
"""
