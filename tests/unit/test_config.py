"""Settings: platform.yaml defaults, RAYDOCK_* environment variables over them, then
explicit overrides."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from raydock import config
from raydock.config import load_settings


def test_environment_variables_override_the_yaml_defaults(monkeypatch):
    defaults = load_settings()
    monkeypatch.setenv("RAYDOCK_PORT", "9123")
    monkeypatch.setenv("RAYDOCK_CLUSTER_AUTOSCALING", "yes")
    monkeypatch.setenv("RAYDOCK_MAX_REQUEST_BYTES", "1024")
    monkeypatch.setenv("RAYDOCK_DATABASE_URL", "postgresql://db/raydock")
    s = load_settings()
    assert (s.port, s.cluster_autoscaling, s.max_request_bytes) == (9123, True, 1024)
    assert s.db_url == "postgresql://db/raydock"
    assert s.stream_interval_ms == defaults.stream_interval_ms  # the rest stays
    assert load_settings(port=9999).port == 9999  # an explicit override wins over both


def test_an_empty_variable_is_unset_but_for_text(monkeypatch):
    """An unset compose variable arrives empty: RAYDOCK_METERING= turned metering (and with
    it every key's limits and budget) off, RAYDOCK_HOME= made the data dir the cwd, and
    RAYDOCK_HOST= the host every interface."""
    defaults = load_settings()
    for name in ("METERING", "PORT", "HOME", "HOST", "CACHE_MAX_GB"):
        monkeypatch.setenv(f"RAYDOCK_{name}", "")
    s = load_settings()
    assert (s.metering, s.port, s.home, s.host, s.cache_max_gb) == (
        defaults.metering,
        defaults.port,
        defaults.home,
        defaults.host,  # an empty host would listen on every interface
        defaults.cache_max_gb,
    )
    # text whose default is empty: empty clears what platform.yaml set
    monkeypatch.setenv("RAYDOCK_SMTP_HOST", "")
    assert load_settings(smtp_host=None).smtp_host == ""


def test_a_secret_key_that_is_not_one_is_refused_before_ray_starts(monkeypatch):
    from raydock.config import SettingsError
    from raydock.platform.bootstrap import configured_secret_key

    monkeypatch.setenv("RAYDOCK_SECRET_KEY", "correct horse battery staple")
    with pytest.raises(SettingsError, match=r"RAYDOCK_SECRET_KEY is not a key .*\(44 characters\)"):
        configured_secret_key()
    key = "k" * 43 + "="
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", f" {key}\n")
    assert configured_secret_key() == key


def test_an_unknown_key_in_platform_yaml_is_refused(tmp_path, monkeypatch):
    (tmp_path / "platform.yaml").write_text("port: 8000\nmax_tokns: 3\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match="max_tokns"):
        load_settings()


def test_a_setting_the_platform_cannot_start_with_is_named(monkeypatch):
    from raydock.config import SettingsError, load_settings

    monkeypatch.setenv("RAYDOCK_PORT", "eighty")
    with pytest.raises(SettingsError, match="RAYDOCK_PORT is 'eighty'; it must be an integer"):
        load_settings()
    monkeypatch.delenv("RAYDOCK_PORT")
    monkeypatch.setenv("RAYDOCK_DELIVERY_RETENTION_DAYS", "40000")
    with pytest.raises(SettingsError, match="delivery_retention_days is 40000; .* 0 and 36500"):
        load_settings()
    monkeypatch.delenv("RAYDOCK_DELIVERY_RETENTION_DAYS")
    # a negative time, a port that cannot be, a chunk too small to carry a model: refused
    for name, value, allowed in (
        ("UPLOAD_SESSION_TTL_S", "-5", "60 and 31536000"),
        ("PORT", "70000", "1 and 65535"),
        ("UPLOAD_CHUNK_MAX_BYTES", "0", "1024 and 4294967296"),
        ("CACHE_MAX_GB", "-1.5", "0 and 1000000"),
    ):
        monkeypatch.setenv(f"RAYDOCK_{name}", value)
        with pytest.raises(SettingsError, match=f"{name.lower()} is {value}; .* {allowed}$"):
            load_settings()
        monkeypatch.delenv(f"RAYDOCK_{name}")


def test_every_numeric_setting_has_a_range():
    """A numeric setting added without a range would take any value, negative included."""
    from raydock.config import RANGES, Settings

    numeric = {f.name for f in fields(Settings) if type(f.default) in (int, float)}
    assert numeric == set(RANGES)
    assert all(low <= getattr(Settings(), name) <= high for name, (low, high) in RANGES.items())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("port: 8k", "port in platform.yaml is '8k'; it must be an integer"),
        ("max_archive_bytes: 20e9", "'20e9'; it must be an integer"),  # YAML reads a string
        ("ray_num_cpus: 2.9", "ray_num_cpus in platform.yaml is 2.9; it must be an integer"),
        ('metering: "maybe"', "metering in platform.yaml is 'maybe'; it must be true or false"),
    ],
)
def test_a_wrong_typed_value_in_platform_yaml_is_named_not_misread(
    tmp_path, monkeypatch, line, message
):
    (tmp_path / "platform.yaml").write_text(line + "\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(config.SettingsError, match=message):
        load_settings()


def test_quoted_yaml_values_and_a_relative_home_are_read_as_meant(tmp_path, monkeypatch):
    (tmp_path / "platform.yaml").write_text('metering: "false"\nport: "9000"\n')
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    s = load_settings(home="rd")
    assert (s.metering, s.port) == (False, 9000)  # "false" was True
    # every actor and replica resolves the home where it runs: it is made absolute here
    assert s.home == str(tmp_path / "rd") and s.cache_location == str(tmp_path / "rd" / "cache")
    assert load_settings(home="~/x").home == "~/x"  # `~`: each node's own home


def test_job_tasks_get_the_settings_without_a_secret():
    secrets = {name: f"s3cr3t-{name}" for name in config.SECRET_SETTINGS}
    settings = config.Settings(**secrets, artifact_root="s3://bucket/hub")
    given = settings.without_secrets()
    assert not [k for k, v in given.items() if "s3cr3t" in str(v)]
    assert config.Settings(**given).artifact_access() == settings.artifact_access()
    # a setting named as a secret is listed as one (the S3 endpoint is an address, no more)
    named = {
        f.name for f in fields(config.Settings) if re.search("password|secret|token|url$", f.name)
    }
    assert named - {"s3_endpoint_url"} == set(config.SECRET_SETTINGS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: 8000\n  bad: indent\n", r"platform.yaml:2: not valid YAML"),
        ("- a list\n", r"platform.yaml: must be a mapping of settings"),
    ],
)
def test_a_platform_yaml_that_is_not_settings_is_named_with_its_line(
    tmp_path, monkeypatch, text, message
):
    (tmp_path / "platform.yaml").write_text(text)
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(config.SettingsError, match=message):
        load_settings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu-x: {num_cpus: 1, memory_gb: 2\n", r"hardware.yaml:2: not valid YAML"),
        (
            "cpu-x: {num_cpus: 1, memory_gb: 16GB}\n",
            r"cpu-x: memory_gb must be a number above 0 \(got '16GB'\)",
        ),
        ("cpu-x: {num_cpus: 1}\n", r"cpu-x: memory_gb must be a number above 0$"),
        (
            "gpu-x: {memory_gb: 8, tensor_parallel_size: 1.5}\n",
            r"tensor_parallel_size must be an integer",
        ),
        (
            "gpu-x: {memory_gb: 8, device: tpu}\n",
            r"gpu-x: device must be cpu or cuda \(got 'tpu'\)",
        ),
        ("cpu-x: small\n", r"cpu-x: must be a mapping of resources"),
    ],
)
def test_a_hardware_yaml_mistake_names_the_device_type_and_field(
    tmp_path, monkeypatch, text, message
):
    (tmp_path / "hardware.yaml").write_text(text)
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    config.hardware_profiles.cache_clear()
    try:
        with pytest.raises(config.SettingsError, match=message):
            config.hardware_profiles()
    finally:
        config.hardware_profiles.cache_clear()


def test_the_shipped_hardware_yaml_passes_its_checks():
    config.hardware_profiles.cache_clear()
    assert "cpu-small" in config.hardware_profiles()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("10.1.2.3", "http://10.1.2.3:8000"),  # an address of its own: loopback is not served
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://127.0.0.1:8000"),
        ("::1", "http://[::1]:8000"),
    ],
)
def test_the_api_reaches_the_ingress_on_its_node_where_it_listens(host, url):
    """The Playground's requests go to the ingress of the API's node (api_web)."""
    assert load_settings(host=host, port=8000).local_url == url
