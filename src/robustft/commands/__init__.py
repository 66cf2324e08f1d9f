"""The command layer: what ``robustft <command>`` does, over the library (runner, methods, report).

``cli.py`` parses the command line and calls these functions; nothing below the command layer imports
them, so a method or the engine never reaches up to a command.
"""
