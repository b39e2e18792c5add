"""Queue ``validate``: deterministic checks, or a Haiku format check; then done, retry, escalate or
fail."""

from pipeline.flow import stages
from workers.base import StageTask
from workers.celery import app


class Validate(StageTask):
    stage = staticmethod(stages.validate)


@app.task(base=Validate, bind=True, name="switchyard.validate")
def validate(self: Validate, job_id: int) -> None:
    self.run_stage(job_id)
