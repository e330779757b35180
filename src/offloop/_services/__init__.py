"""Long-lived blocking parts of a program, as services a Supervisor runs.

``base.py`` is the ``Service`` contract; ``lifecycle.py`` the one lifecycle
(states, illegal moves) every service below goes through; ``adapters.py`` the
argument checks and the listening socket the server adapters (``wsgi.py``,
``aiohttp_app.py``, ``asgi.py``) share, and ``_thirdparty.py`` every internal
of waitress, uvicorn and aiohttp they rely on (contract-tested); ``watch.py``
the file watcher; ``functions.py`` plain and async functions run as services,
``process.py`` such a function in a child process, ``make.py`` the choice
between them.
"""
