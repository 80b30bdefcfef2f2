"""The WSGI entry point for gunicorn (``wsgi:app``), imported in each worker after the fork.

Order matters: gevent patches the standard library first, then psycogreen makes psycopg2
cooperative, and only then is anything that may create an engine imported.
"""

import gc

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

from api.app import create_app  # noqa: E402
from config.admin_key import ensure_admin_key  # noqa: E402
from config.settings import Settings  # noqa: E402

settings = Settings.from_env()
app = create_app(settings, admin_key=ensure_admin_key(settings)[0])

# Everything built so far lives as long as the worker: move it out of the collector's sight and
# collect the young generation less often, so full collections (which walk every object and
# stall every greenlet of the worker) become rare.
gc.freeze()
gc.set_threshold(50_000, 20, 100)

if settings.scheduler_enabled and settings.plane != "device":  # the device plane runs no jobs
    from scheduler.service import start_scheduler  # noqa: E402

    state = app.extensions["nexmdm"]
    start_scheduler(settings, state.engine, on_report=state.job_metrics.observe_report)
