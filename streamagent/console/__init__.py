"""The composition root: the only code that names processors and tools.

Its rooms, each a folder:

- the front door: the command line (``cli``) and what it prints (``tables``, ``timeline``, ``report``,
  the demos);
- ``devstack/``: the development stack behind ``up``: its supervisor, stack file, embedded PostgreSQL
  and the journal broker (``devstack/broker/``);
- ``replay/``: rebuilding state and re-deciding from the log;
- ``ui/``: the read-only run page and its JSON API.

Nothing below it (the runtime library ``streamagent``, ``streamagent.processors``, ``streamagent.tools``)
imports it, and ``tests/unit/test_layout.py`` keeps each room to its own business.
"""
