"""pytest plugin: fail tests whose event loop blocks (registered as ``pytest11``)."""
