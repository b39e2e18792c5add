"""The flow of a job, in the order it meets each piece: ``dispatch`` feeds queued jobs to the
stages, refeeds those that waited out transient errors and sweeps stalled ones; ``stages`` runs
triage, work and validation, each through ``states`` (the one state machine of conditional
updates); ``routing`` decides where a job goes next; ``prompts`` builds each stage's request, and
``warmup`` lets one call at a time write a cached prompt prefix while the others wait;
``validation`` judges an answer, running a tenant's JSON Schema confined (``schema_check``);
``runtime`` assembles these from Settings for the entry points."""
