"""``python -m streamagent.console``: the command line, for child processes started by the supervisor."""

from streamagent.console.cli import main

raise SystemExit(main())
