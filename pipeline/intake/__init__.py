"""Intake: how jobs enter. ``jobspec`` checks one job; ``enqueue`` reads a file or a request body
into checked jobs; ``write`` writes them into Postgres (COPY for a new batch, chunks otherwise)."""
