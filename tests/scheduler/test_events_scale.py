"""At fleet scale (slow: make test-faults): 150,000 devices, 10 % silent at once; one events run
records the 15,000 device_offline events in < 5 s and a webhook receives them in batches."""

from __future__ import annotations

import pytest

from bench.events import TARGET_S, run_outage


@pytest.mark.slow
def test_carrier_outage_of_15000_devices_is_one_quick_run(engine, settings):
    result = run_outage(engine, settings, devices=150_000, share_pct=10)
    print("\n" + "\n".join(result.lines()))
    assert result.silenced == 15_000
    assert result.events == {"device_offline": 15_000}
    assert result.burst_run_s < TARGET_S
    assert result.webhook_events == 15_000 and result.webhook_batches == 15_000 // settings.webhook_batch_max
