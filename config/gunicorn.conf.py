"""gunicorn settings for NexMDM (gevent workers). The launcher (python -m api serve) passes
HOST, PORT and WEB_CONCURRENCY through the environment; Settings is the one reader."""

from config.settings import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.web_concurrency
worker_class = "gevent"
worker_connections = 4000
keepalive = 75  # devices and load generators keep connections open between heartbeats
timeout = 30
graceful_timeout = 20
preload_app = False  # no engine, no greenlet before the fork
accesslog = None
errorlog = "-"
loglevel = "warning"
proc_name = "nexmdm"
