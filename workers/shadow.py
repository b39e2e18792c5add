"""Shadow evaluation's steps (pipeline.flow.shadow), on the reference tier's queue at the lowest
priority: the reference tier works a sampled job again after it succeeded, and the answers are compared."""

from pipeline.flow import shadow
from workers.base import StageTask
from workers.celery import app


class Shadow(StageTask):
    stage = staticmethod(shadow.run)


@app.task(base=Shadow, bind=True, name="switchyard.shadow")
def shadow_step(self: Shadow, job_id: int) -> None:
    self.run_stage(job_id)
