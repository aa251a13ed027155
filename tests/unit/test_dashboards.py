"""The shipped Grafana dashboard and Prometheus config against the metrics raydock exports.

No Ray: what `/metrics` exports is what `render` makes of a batch (`raydock.metering`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from raydock.metering import catalog
from raydock.metering.batch import Batch
from raydock.metering.exposition import render

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "configs" / "grafana" / "raydock.json"
PROMETHEUS = ROOT / "configs" / "prometheus.yml"

_NAME = re.compile(r"(?<![A-Za-z0-9_:])raydock_[A-Za-z0-9_:]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panels(panels: list[dict]):
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs(path: str | Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel of the dashboard at `path`."""
    dashboard = json.loads(Path(path).read_text())
    return [
        (panel.get("title", ""), target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def expr_metric_names(expr: str) -> set[str]:
    """The raydock sample names an expr reads, as a scrape spells them."""
    return set(_NAME.findall(expr))


def dashboard_metric_names(path: str | Path = DASHBOARD) -> set[str]:
    """Every raydock sample name the dashboard's queries read, exactly as they appear in a
    scrape (`raydock_requests_total`, `raydock_time_to_first_token_seconds_bucket`, ...)."""
    names: set[str] = set()
    for _, expr in dashboard_exprs(path):
        names |= expr_metric_names(expr)
    return names


def exported_sample_names(text: str) -> set[str]:
    """The sample names a scrape of `text` can hold, family by family (a family with no
    series yet still counts): counters `<family>_total`, histograms `_bucket`/`_sum`/`_count`
    (the parser names counter families without `_total`)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in _HISTOGRAM_SUFFIXES}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def _family(sample_name: str) -> str:
    """A sample name's catalog name (histograms: without `_bucket`/`_sum`/`_count`)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and base in catalog.BY_NAME:
            return base
    return sample_name


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_sample_names(render(Batch()).decode())


def test_every_query_names_an_exported_metric(exported):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = expr_metric_names(expr)
        assert names, f"{title!r}: no raydock metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{title!r}: {sorted(unknown)} not exported by /metrics: {expr!r}"
        for name in names:
            metric = catalog.BY_NAME[_family(name)]
            if metric.kind == "histogram":
                assert name != metric.name, f"{title!r}: histogram {name} without a suffix"


def test_every_catalog_metric_is_on_the_dashboard():
    families = {_family(name) for name in dashboard_metric_names()}
    missing = [m.name for m in catalog.ALL if m.name not in families]
    assert not missing, f"no panel reads {missing}"


def test_quantiles_read_buckets_and_rates_use_grafana_intervals():
    for title, expr in dashboard_exprs():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{title!r}: [{window}]"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, f"{title!r}: a quantile not over buckets"
            assert re.search(r"by \([^)]*\ble\b", expr), f"{title!r}: quantile not by le"


def test_datasource_and_variables(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"

    dep = variables["deployment"]
    assert dep["type"] == "query" and dep["multi"] and dep["includeAll"]
    assert dep["datasource"] == DATASOURCE
    query = dep["query"]["query"] if isinstance(dep["query"], dict) else dep["query"]
    assert query == "label_values(raydock_requests_total, deployment)"

    ids = []
    for panel in _panels(dashboard["panels"]):
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            if 'deployment=~"' in target["expr"]:
                assert 'deployment=~"$deployment"' in target["expr"], panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_prometheus_config():
    text = PROMETHEUS.read_text()
    config = yaml.safe_load(text)
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    raydock = jobs["raydock"]
    assert raydock.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for c in raydock["static_configs"] for t in c["targets"]]
    assert targets == ["127.0.0.1:8000"]

    files = [f for c in jobs["ray"]["file_sd_configs"] for f in c["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]

    # the commented bearer-token block is valid config once uncommented
    uncommented = re.sub(r"(?m)^(\s*)# (authorization:|  type:|  credentials:)", r"\1\2", text)
    job = {j["job_name"]: j for j in yaml.safe_load(uncommented)["scrape_configs"]}["raydock"]
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials"]
