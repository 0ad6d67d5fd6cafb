"""probedsl: a declarative language for paired-resource eBPF tracing."""

__version__ = "0.1.0"
