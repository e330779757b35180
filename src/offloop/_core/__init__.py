"""The shared core: what every capability builds on, and nothing above it.

Errors, the stop token and the calling thread's record, argument checks, the
offload future every pool returns, the pool life cycle, restart policies and
lazy extras. Modules here import only the standard library and each other.
"""
