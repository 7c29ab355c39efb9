"""Total cost of ownership: the distilled student on your own server(s) against a cloud API, and when the server
has paid for itself. Pure arithmetic on the `tco` config section; `stillhouse check` puts it in its report.

    monthly tokens     = requests/day x tokens/request x 30.4 days
    cloud per month    = monthly tokens / 1e6 x cloud price per million tokens
    servers            = ceil(peak generated tokens/s / student tokens/s per server), at least 1
    on-prem per month  = servers x price / lifetime (write-off) + servers x kW x 730 h x price/kWh + operations
    break-even month   = first month in which the cloud's cumulative cost reaches the purchase price plus the
                         cumulative running cost (power + operations); none when the cloud is cheaper to run
"""

from __future__ import annotations

import math

DAYS_PER_MONTH = 365.25 / 12  # 30.44
HOURS_PER_MONTH = 24 * DAYS_PER_MONTH  # 730.5


def tco(tc, measured_tokens_per_s: float | None = None) -> dict:
    """The cost comparison for a `TcoConfig`. `measured_tokens_per_s`: the student's generated tokens/s from eval,
    used when `tc.student_tokens_per_s` is "measured". Every input is echoed under "inputs", with its source."""
    explicit = tc.model_fields_set
    inputs = {name: {"value": getattr(tc, name), "source": "config" if name in explicit else "default"}
              for name in type(tc).model_fields}
    throughput, source = tc.student_tokens_per_s, "config (planned)"
    if throughput == "measured":
        throughput = measured_tokens_per_s
        source = "measured by eval (tokens/s batched)" if throughput else "measured: eval has not run yet"
    inputs["student_tokens_per_s"] = {"value": throughput, "source": source if throughput or tc.student_tokens_per_s else "not set"}

    monthly_tokens = tc.requests_per_day * tc.tokens_per_request * DAYS_PER_MONTH
    cloud_monthly = monthly_tokens / 1e6 * tc.cloud_price_per_million_tokens

    # generated tokens/s the servers must sustain at peak: average over the day x peak factor
    peak_tokens_per_s = tc.requests_per_day * tc.response_tokens_per_request / 86400 * tc.peak_to_average
    servers = max(1, math.ceil(peak_tokens_per_s / throughput)) if throughput else 1
    capex = servers * tc.server_price
    write_off_monthly = capex / tc.lifetime_months
    energy_monthly = servers * tc.power_watts / 1000 * HOURS_PER_MONTH * tc.electricity_price_per_kwh
    running_monthly = energy_monthly + tc.operations_per_month  # what it costs once the servers are bought
    onprem_monthly = write_off_monthly + running_monthly

    saving = cloud_monthly - running_monthly
    if capex == 0 and saving >= 0:
        break_even = 0
    elif saving > 0:
        break_even = math.ceil(capex / saving)
    else:
        break_even = None  # running the server costs more per month than the cloud: it never pays back
    per_million = (lambda cost: cost / (monthly_tokens / 1e6)) if monthly_tokens else (lambda cost: None)
    notes = []
    if not throughput:
        notes.append("no student throughput known (set tco.student_tokens_per_s to a number, or to 'measured' after eval): "
                     "one server assumed to carry the load")
    if break_even is None:
        notes.append("power and operations alone cost more per month than the cloud API: the server never pays back")
    elif break_even > tc.lifetime_months:
        notes.append(f"break-even (month {break_even}) comes after the server's lifetime ({tc.lifetime_months} months)")
    return {
        "currency": tc.currency,
        "inputs": inputs,
        "monthly_tokens": round(monthly_tokens),
        "peak_generated_tokens_per_s": round(peak_tokens_per_s, 2),
        "servers": servers,
        "cloud": {"monthly": round(cloud_monthly, 2), "per_million_tokens": tc.cloud_price_per_million_tokens},
        "on_prem": {
            "monthly": round(onprem_monthly, 2),
            "write_off_monthly": round(write_off_monthly, 2),
            "energy_monthly": round(energy_monthly, 2),
            "operations_monthly": tc.operations_per_month,
            "per_million_tokens": None if per_million(onprem_monthly) is None else round(per_million(onprem_monthly), 4),
            "purchase": capex,
        },
        "break_even_month": break_even,
        "pays_back_within_lifetime": break_even is not None and break_even <= tc.lifetime_months,
        "notes": notes,
    }


def markdown(t: dict) -> list[str]:
    """The TCO section of check/report.md: the result table, then every input with its source."""
    c = t["currency"]
    on, cloud = t["on_prem"], t["cloud"]
    per_m = "-" if on["per_million_tokens"] is None else f"{on['per_million_tokens']:,.4f}"
    be = t["break_even_month"]
    lines = [
        "## Cost: on-premises vs cloud API",
        "",
        f"{t['monthly_tokens']:,} tokens per month; peak {t['peak_generated_tokens_per_s']:,} generated tokens/s "
        f"-> {t['servers']} server(s).",
        "",
        f"| option | per month ({c}) | per million tokens ({c}) |",
        "|---|---|---|",
        f"| cloud API | {cloud['monthly']:,.2f} | {cloud['per_million_tokens']:,.4f} |",
        f"| on-premises | {on['monthly']:,.2f} (write-off {on['write_off_monthly']:,.2f} + power {on['energy_monthly']:,.2f} "
        f"+ operations {on['operations_monthly']:,.2f}) | {per_m} |",
        "",
        f"Break-even: **{'never' if be is None else f'month {be}'}** (purchase {on['purchase']:,.0f} {c}).",
        *[f"- note: {n}" for n in t["notes"]],
        "",
        "Inputs (override any with `--set tco.NAME=VALUE`):",
        "",
        "| input | value | source |",
        "|---|---|---|",
        *[f"| tco.{k} | {v['value']} | {v['source']} |" for k, v in t["inputs"].items()],
        "",
    ]
    return lines
