"""The `switchyard` command: ``app`` is the entry point; ``common`` holds the Typer app and what the
command modules share; ``operate``, ``history`` and ``tenants`` hold the commands by group;
``status``, ``tables`` and ``demo`` are their views and the demo's runner."""
