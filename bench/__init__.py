"""switchyard's benchmarks: the pipeline's own cost, measured against what a user would run instead.

Each benchmark measures switchyard and its baseline side by side in the same run, on the local
Postgres, Redis and the fake Claude, and reports ratios: these machines are shared and noisy, and
an absolute figure means little on them. They are not tests and never run from ``make test``.

    python -m bench                 # all twelve, full size (about an hour)
    python -m bench --quick         # all twelve, small (about 4 minutes)
    python -m bench overhead --quick
"""
