"""Queue ``triage``: Haiku judges each job easy, medium or hard, and routes it."""

from pipeline.flow import stages
from workers.base import StageTask
from workers.celery import app


class Triage(StageTask):
    stage = staticmethod(stages.triage)


@app.task(base=Triage, bind=True, name="switchyard.triage")
def triage(self: Triage, job_id: int) -> None:
    self.run_stage(job_id)
