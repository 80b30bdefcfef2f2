"""gunicorn settings for NexMDM (gevent workers), one gunicorn per plane. The launcher
(python -m api serve) passes PLANE, HOST/PORT/WEB_CONCURRENCY (device plane, or both planes when
not split) and ADMIN_HOST/ADMIN_PORT/ADMIN_CONCURRENCY (operator plane) through the environment;
Settings is the one reader."""

from config.settings import Settings

_settings = Settings.from_env()

if _settings.plane == "operator":
    bind = f"{_settings.admin_host}:{_settings.admin_port}"
    workers = _settings.admin_concurrency
else:
    bind = f"{_settings.host}:{_settings.port}"
    workers = _settings.web_concurrency
# gunicorn's gevent worker (-k gevent), sending each response in one write: see
# config/gunicorn_worker.py.
worker_class = "config.gunicorn_worker.CoalescingGeventWorker"
sendfile = False  # every write goes through that worker's buffer, in order
# The worker's ConnectionGuard keeps at most WORKER_CONNECTIONS open (shedding the one waiting
# longest); gevent's pool gets a little more, so that a new connection is accepted to shed one.
worker_connections = _settings.worker_connections + 64
# Keep-alive on (devices and load generators keep connections open between heartbeats); how long
# an idle one is kept is HTTP_IDLE_TIMEOUT_S, enforced by the guard.
keepalive = max(1, round(_settings.http_idle_timeout_s))
timeout = 30
graceful_timeout = 20
preload_app = False  # no engine, no greenlet before the fork
accesslog = None
errorlog = "-"
loglevel = "warning"
if _settings.log_format == "json":  # gunicorn's own lines as JSON too (config/logs.py)
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "config.logs.JsonFormatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
        # The root logger is left to config/logs.py (else every line would show twice); access
        # lines stay off as in text mode (accesslog is None).
        "root": {"level": "WARNING", "handlers": []},
        "loggers": {
            "gunicorn.error": {"level": "WARNING", "handlers": ["console"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
        },
    }
proc_name = f"nexmdm-{_settings.plane}"


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Say so when /metrics would show one worker per scrape instead of the whole server."""
    if _settings.prometheus_multiproc_dir is None and workers > 1:
        server.log.warning(
            "PROMETHEUS_MULTIPROC_DIR is unset: each scrape of /metrics covers one worker only. "
            "Start through `python -m api serve`, or set it to an emptied directory."
        )


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """A worker died or was replaced: drop its live gauges (pool figures, worker count) so
    they are no longer summed; its counters and histograms stay counted."""
    if _settings.prometheus_multiproc_dir is not None:
        # Not api.metrics: importing it would create metric files for the master itself.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, str(_settings.prometheus_multiproc_dir))
