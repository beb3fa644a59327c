"""The run timeline page: a read-only web view of runs, their timelines and the dead letters.

``api`` turns the projection's rows into the JSON the page reads, ``server`` serves that JSON and the
page itself (``static/``: plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere).
"""

from streamagent.console.ui.server import UiServer, serve

__all__ = ["UiServer", "serve"]
