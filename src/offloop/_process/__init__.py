"""CPU-bound work in child processes or on a Dask cluster.

``pool.py`` is the parent-side pool (``ProcessPool``), ``toprocess.py`` the
default one behind ``to_process``,
``workers.py`` its view of each child, ``child.py`` what runs in the child,
``writer.py``/``message.py``/``pickling.py`` the wire, ``dask.py`` ``DaskPool``.
"""
