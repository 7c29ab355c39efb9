"""TCO and break-even: the arithmetic against numbers worked by hand, its edge cases, the config errors, and the
section in the real check report (every input echoed, `--set` overrides)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from stillhouse.config import TcoConfig, load_config, validate
from stillhouse.errors import StillhouseError
from stillhouse.tco import DAYS_PER_MONTH, HOURS_PER_MONTH, tco


def test_numbers_worked_by_hand():
    tc = TcoConfig(requests_per_day=100_000, tokens_per_request=1000, response_tokens_per_request=200, peak_to_average=2,
                   cloud_price_per_million_tokens=2.0, server_price=24_000, lifetime_months=24, power_watts=2000,
                   electricity_price_per_kwh=0.5, operations_per_month=100, student_tokens_per_s=300)
    t = tco(tc)
    month_tokens = 100_000 * 1000 * DAYS_PER_MONTH  # 3.04e9
    assert t["monthly_tokens"] == round(month_tokens)
    assert t["cloud"]["monthly"] == pytest.approx(month_tokens / 1e6 * 2.0, abs=0.01)  # ~6,087.5
    # peak: 100k x 200 / 86400 x 2 = 463 tokens/s -> 2 servers of 300 tokens/s
    assert t["peak_generated_tokens_per_s"] == pytest.approx(462.96, abs=0.01)
    assert t["servers"] == 2
    energy = 2 * 2.0 * HOURS_PER_MONTH * 0.5  # 2 servers x 2 kW x 730.5 h x 0.5 = 1,461
    assert t["on_prem"]["energy_monthly"] == pytest.approx(energy, abs=0.01)
    assert t["on_prem"]["write_off_monthly"] == pytest.approx(2 * 24_000 / 24)
    on_month = 2000 + energy + 100
    assert t["on_prem"]["monthly"] == pytest.approx(on_month, abs=0.01)
    assert t["on_prem"]["per_million_tokens"] == pytest.approx(on_month / (month_tokens / 1e6), abs=1e-4)
    # 48,000 purchase / (6,087.5 - 1,561) saved per month = 10.6 -> month 11
    assert t["break_even_month"] == 11 and t["pays_back_within_lifetime"]
    # cumulative check: at month 11 the cloud has cost at least as much as buying + running, at month 10 not
    cloud, running = t["cloud"]["monthly"], energy + 100
    assert 11 * cloud >= 48_000 + 11 * running and 10 * cloud < 48_000 + 10 * running


def test_never_pays_back_and_beyond_lifetime():
    cheap_cloud = tco(TcoConfig(cloud_price_per_million_tokens=0.01, power_watts=1000, student_tokens_per_s=1000))
    assert cheap_cloud["break_even_month"] is None and not cheap_cloud["pays_back_within_lifetime"]
    assert any("never pays back" in n for n in cheap_cloud["notes"])
    slow = tco(TcoConfig(requests_per_day=5000, cloud_price_per_million_tokens=3.0, lifetime_months=12,
                         student_tokens_per_s=1000))
    assert slow["break_even_month"] > 12 and not slow["pays_back_within_lifetime"]
    assert any("after the server's lifetime" in n for n in slow["notes"])


def test_throughput_source_planned_measured_or_unknown():
    assert tco(TcoConfig(), measured_tokens_per_s=50.0)["inputs"]["student_tokens_per_s"]["source"] == "not set"
    not_yet = tco(TcoConfig(student_tokens_per_s="measured"), measured_tokens_per_s=None)
    assert not_yet["inputs"]["student_tokens_per_s"]["source"] == "measured: eval has not run yet" and not_yet["servers"] == 1
    measured = tco(TcoConfig(requests_per_day=1e6, student_tokens_per_s="measured"), measured_tokens_per_s=50.0)
    assert measured["inputs"]["student_tokens_per_s"]["value"] == 50.0
    assert measured["servers"] == pytest.approx(1e6 * 100 / 86400 * 3 / 50, abs=1)  # 69.4 -> 70
    planned = tco(TcoConfig(requests_per_day=1e6, student_tokens_per_s=5000), measured_tokens_per_s=50.0)
    assert planned["servers"] == 1 and planned["inputs"]["student_tokens_per_s"]["source"] == "config (planned)"


def test_every_input_is_echoed_with_its_source(tmp_path):
    cfg = load_config(tmp_path, ["tco.server_price=12000"], required=False)
    inputs = tco(cfg.tco)["inputs"]
    assert set(inputs) == set(TcoConfig.model_fields)
    assert inputs["server_price"] == {"value": 12000, "source": "config"}
    assert inputs["power_watts"]["source"] == "default"


@pytest.mark.parametrize("key", ["server_price", "cloud_price_per_million_tokens", "electricity_price_per_kwh",
                                 "requests_per_day"])
def test_negative_inputs_name_the_key(tmp_path, key):
    with pytest.raises(StillhouseError, match=rf"'tco\.{key}'.*greater than or equal to 0"):
        load_config(tmp_path, [f"tco.{key}=-1"], required=False)


def test_check_report_has_the_tco_section_and_set_overrides_it(tmp_path, tiny_model_dir):
    from stillhouse.stages import check
    from stillhouse.workspace import atomic_write_json

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n")
    ws = tmp_path / "ws"
    cfg = validate({"teacher": {"model": str(teacher)}, "student": {"derive_layers": 2},
                    "tco": {"cloud_price_per_million_tokens": 3.0}}, ws, "test")
    first = check.run(cfg)
    report = json.loads((ws / "check" / "report.json").read_text())
    assert report["tco"]["inputs"]["cloud_price_per_million_tokens"] == {"value": 3.0, "source": "config"}
    md = (ws / "check" / "report.md").read_text()
    assert "## Cost: on-premises vs cloud API" in md and "| tco.server_price | 30000 | default |" in md
    # eval's measured tokens/s is used only when asked for (else every eval would make the next `run` re-check)
    atomic_write_json(ws / "eval" / "manifest.json", {"metrics": {"models": {"student": {"tokens_per_s_batched": 40.0}}}})
    assert check.run(cfg)["finished_at"] == first["finished_at"]

    # the real CLI: a --set changes the numbers (a new check, not the skipped one), a negative price is one line
    (ws / "stillhouse.yaml").write_text(f"teacher: {{model: {teacher}}}\nstudent: {{derive_layers: 2}}\n")
    run = [sys.executable, "-m", "stillhouse", "-w", str(ws), "check"]
    p = subprocess.run(run + ["--set", "tco.server_price=90000", "--set", "tco.student_tokens_per_s=measured",
                              "--set", "tco.requests_per_day=100000"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    again = json.loads((ws / "check" / "report.json").read_text())["tco"]
    assert again["on_prem"]["purchase"] == 9 * 90000 and again["inputs"]["server_price"]["source"] == "config"
    assert again["inputs"]["student_tokens_per_s"] == {"value": 40.0, "source": "measured by eval (tokens/s batched)"}
    assert again["servers"] == 9  # 100,000 requests x 100 tokens / 86,400 s x 3 (peak) = 347 tokens/s / 40 per server
    bad = subprocess.run(run + ["--set", "tco.electricity_price_per_kwh=-0.2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tco.electricity_price_per_kwh" in bad.stderr and "Traceback" not in bad.stderr
