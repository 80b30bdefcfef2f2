"""The HTTP API (Flask). Build it with api.app.create_app(settings)."""
