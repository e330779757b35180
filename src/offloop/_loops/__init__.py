"""Event loops in threads of their own, and crossings between loops and threads.

``LoopThread`` (a loop in a thread), ``to_loop`` (a coroutine that blocks, moved
to a loop thread), ``from_thread`` (a coroutine run on a loop, from a thread),
``Portal`` (every other crossing from sync code: sync functions, timeouts,
futures, tasks, async context managers and iterators), and ``crossing``, the
one mechanism the blocking ones use to hand a call over.
"""
