"""The blocking detector: find which line of the program blocks the event loop.

``detector.py`` (``BlockingDetector``), ``hook.py`` (installing it into a loop
that someone else starts: ``offloop check`` and the pytest plugin),
``report.py`` (turning a stack into the user's line), ``thresholds.py``.
"""
