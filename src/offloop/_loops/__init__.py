"""Event loops in threads of their own, and crossings between loops and threads.

``LoopThread`` (a loop in a thread), ``to_loop`` (a coroutine that blocks, moved
to a loop thread), ``from_thread`` (a coroutine run on a loop, from a thread),
and ``crossing``, the one mechanism each of them uses to hand a call over.
"""
