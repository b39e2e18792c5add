"""The HTTP API (`switchyard serve`): FastAPI over the same domain functions as the CLI."""

from pipeline.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
