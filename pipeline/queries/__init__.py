"""The read side: ``history`` (jobs, batches, a job's story, exports), ``report`` (stats per tier,
the routing math, failure reasons) and ``ops`` (queues, workers and their heartbeats, as
`switchyard status` and the API's /v1/queue show them)."""
