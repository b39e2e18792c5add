"""The work queues, one per work tier (``sonnet`` and ``opus``, and ``haiku`` under a cascade
policy): the work itself. One task; the queue it is published to is the tier the job was routed
to, so each tier's workers scale on their own."""

from pipeline.flow import stages
from workers.base import StageTask
from workers.celery import app


class Work(StageTask):
    stage = staticmethod(stages.work)


@app.task(base=Work, bind=True, name="switchyard.work")
def work(self: Work, job_id: int) -> None:
    self.run_stage(job_id)
