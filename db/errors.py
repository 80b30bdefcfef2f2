"""Domain errors raised by the data layer; api/errors.py maps them to HTTP answers."""


class DataError(Exception):
    """Base of every data-layer error."""


class DeviceNotFound(DataError):
    def __init__(self, device_id: int | str) -> None:
        super().__init__(f"device {device_id} not found")
        self.device_id = device_id


class WebhookNotFound(DataError):
    def __init__(self, webhook_id: int) -> None:
        super().__init__(f"no webhook {webhook_id}")
        self.webhook_id = webhook_id


class DuplicateDevice(DataError):
    def __init__(self, device_uids: list[str]) -> None:
        super().__init__(f"device_uid already enrolled: {', '.join(device_uids[:10])}")
        self.device_uids = device_uids


class DatabaseUnavailable(DataError):
    """The database cannot be reached or the pool is exhausted; worth a retry later."""

    def __init__(self, detail: str, retry_after_s: int = 2) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Overloaded(DataError):
    """The server sheds load (ingest queue full); worth a retry later."""

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
