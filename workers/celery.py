"""The Celery app, for ``celery -A workers ...`` and ``switchyard worker``."""

from workers.config import make_app

app = make_app()
# Task base classes resolve ``self.app`` through Celery's current app, which in a worker's pool
# threads is the library default (amqp://localhost) unless this app is made the default.
app.set_default()
