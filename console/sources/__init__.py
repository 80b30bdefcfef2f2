"""Plain-Python data sources of the console: server polls, the simulator's stream, a local server.

Nothing here imports Textual (tests/console/test_sources.py proves it): the app turns what these
return into messages and widgets.
"""
