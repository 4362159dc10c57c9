"""engram plugin deq-hrr: a deep-equilibrium classifier with a holographic (HRR) memory trace."""

__version__ = "0.1.0"
