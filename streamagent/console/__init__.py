"""The composition root: the only code that names processors and tools.

It holds the command line (``cli``), the supervisor of a running stack (``stack``, ``stackfile``), the
embedded development stack (``embedded``: the journal broker in ``broker/`` and PostgreSQL) and the demo.
Nothing below it (the runtime library ``streamagent``, ``streamagent.processors``, ``streamagent.tools``)
imports it.
"""
