"""The Supervisor: start, watch, restart and stop services, and own signals.

``supervisor.py`` (``Supervisor``), ``supervised.py`` (one service's run and
restart loop), ``status.py`` (the states and status records), ``signals.py``
(``run()``: Ctrl-C, SIGTERM and the bounded forced exit).
"""
