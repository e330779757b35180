"""Long-lived blocking parts of a program, as services a Supervisor runs.

``base.py`` is the ``Service`` contract; ``adapters.py`` the shared life cycle
of the server adapters (``wsgi.py``, ``aiohttp_app.py``, ``asgi.py``);
``watch.py`` the file watcher; ``functions.py`` plain and async functions run as
services; ``process.py`` such a function in a child process.
"""
