"""Sync code in a thread: ``ThreadPool``, ``to_thread``, ``iterate`` and ``threaded``.

The hot path of the library: one call goes ``to_thread`` -> ``ThreadPool.run``
-> a worker in ``pool.py`` -> back through the ``OffloadFuture`` of ``_core``.
"""
