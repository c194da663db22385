"""The chaos soak: sign-ups through the real services while seeded faults hit them.

``python -m tests.chaos`` (``make chaos``) runs it from the command line; ``tests/test_chaos.py``
runs a short version in the test suite. See ``soak.run`` for the flow.
"""
