"""Platform settings: `configs/platform.yaml` defaults, overridden by RAYDOCK_* variables."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(
    os.environ.get("RAYDOCK_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs")
)


@dataclass(frozen=True)
class Settings:
    home: str = "~/.raydock"
    database_url: str = ""
    artifact_root: str = ""
    s3_endpoint_url: str = ""
    cache_dir: str = ""
    cache_max_gb: float = 50.0
    hf_endpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    ray_num_cpus: int = 8
    ray_address: str = ""
    cluster_autoscaling: bool = False
    max_archive_bytes: int = 20 * 2**30
    max_archive_entries: int = 10_000
    max_compression_ratio: float = 200.0
    allow_pickle_weights: bool = False
    upload_chunk_max_bytes: int = 100 * 2**20
    upload_session_ttl_s: int = 86_400  # an idle chunked upload or kept HF download: removed
    stream_interval_ms: int = 50
    max_request_bytes: int = 8 * 2**20
    metrics_token: str = ""
    metering: bool = True
    # ---- notifications (platform/notify.py): email by SMTP, webhooks
    smtp_host: str = ""  # empty: no email
    smtp_port: int = 25
    smtp_from: str = "raydock@localhost"
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)  # never in a repr or a log line
    smtp_starttls: bool = False
    smtp_ssl: bool = False  # TLS from the first byte (port 465) instead of STARTTLS
    notify_emails: str = ""  # comma-separated addresses told of every event
    webhook_url: str = ""  # platform-wide webhook; empty: none
    webhook_secret: str = field(default="", repr=False)
    notify_max_attempts: int = 5
    # users' webhooks may not reach loopback, private, link-local or other non-public
    # addresses (the platform's own network) except these comma-separated networks (CIDR)
    webhook_allowed_networks: str = ""
    # ---- retention (platform/retention.py): 0 keeps for ever
    usage_retention_days: int = 400  # usage minutes older than this are deleted
    delivery_retention_days: int = 90  # delivered or failed notifications older than this
    job_retention_days: int = 90  # finished dock-status jobs (a model's import jobs: see README)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_path / 'raydock.db'}"

    @property
    def artifacts(self) -> str:
        return self.artifact_root or str(self.home_path / "artifacts")

    @property
    def cache_location(self) -> str:
        """Each node's cache of the artifacts its replicas load, unresolved: `~` is the home
        of the node that uses it."""
        return self.cache_dir or str(Path(self.home) / "cache")

    def store(self):
        """The artifact store (raydock.artifacts): a local directory or an S3 bucket."""
        from raydock.artifacts import open_store

        return open_store(self.artifacts, self.s3_endpoint_url or None)

    def artifact_access(self) -> dict[str, Any]:
        """What a replica on any node needs to fetch artifacts: plain data, paths unresolved
        (`~` is the replica's node's home)."""
        return {
            "store": self.artifacts,
            "endpoint": self.s3_endpoint_url,
            "cache_dir": self.cache_location,
            "cache_max_bytes": int(self.cache_max_gb * 2**30),
        }

    @property
    def uploads_path(self) -> Path:
        return self.home_path / "uploads"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def local_url(self) -> str:
        """Where a process on a node reaches that node's HTTP ingress: the host it listens on,
        or loopback when it listens on every address."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def without_secrets(self) -> dict[str, Any]:
        """to_dict() with the secrets blank, for work that needs none of them (the job tasks,
        on any node): Ray keeps a task's arguments in the cluster's state."""
        return {**asdict(self), **dict.fromkeys(SECRET_SETTINGS, "")}


#: settings that are, or may hold, a secret (a database URL's password, a webhook URL's token)
SECRET_SETTINGS = (
    "database_url",
    "metrics_token",
    "smtp_password",
    "webhook_url",
    "webhook_secret",
)


class SettingsError(ValueError):
    """A setting the platform cannot start with; the message names it."""


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(where: str, value: Any, kind: type) -> Any:
    """A setting's value as its type: text (an environment variable, a quoted YAML value)
    parsed, a YAML number or boolean taken as it is; SettingsError naming `where` else."""
    what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text")
    if kind is bool and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise SettingsError(f"{where} is {value!r}; it must be {what}")


def load_settings(**overrides: Any) -> Settings:
    """Defaults from platform.yaml, then RAYDOCK_<KEY> environment variables, then overrides."""
    raw: dict[str, Any] = {}
    path = CONFIG_DIR / "platform.yaml"
    if path.exists():
        found = _yaml_file(path) or {}
        if not isinstance(found, dict):
            raise SettingsError(f"{path}: must be a mapping of settings (name: value)")
        raw.update(found)
    types = {f.name: type(f.default) for f in fields(Settings)}
    unknown = set(raw) - set(types)
    if unknown:
        raise SettingsError(f"unknown settings in platform.yaml: {sorted(unknown)}")
    for name in list(raw):
        if raw[name] is not None:
            raw[name] = _coerce(f"{name} in platform.yaml", raw[name], types[name])
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, kind in types.items():
        env = os.environ.get(f"RAYDOCK_{name.upper()}")
        # empty means unset, but for text whose default is empty (clearing a platform.yaml
        # value): an unset compose variable turned metering (limits, budgets) off, made the
        # data dir the cwd, and the host every interface
        if env is not None and (env.strip() or defaults[name] == ""):
            raw[name] = _coerce(f"RAYDOCK_{name.upper()}", env, kind)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(raw) - set(types)
    if unknown:
        raise SettingsError(f"unknown settings: {sorted(unknown)}")
    settings = Settings(**{k: types[k](v) if v is not None else v for k, v in raw.items()})
    if not settings.home.startswith("~") and not Path(settings.home).is_absolute():
        # every actor and replica resolves it in its own working directory otherwise
        settings = dataclasses.replace(settings, home=str(Path(settings.home).resolve()))
    for name, (low, high) in RANGES.items():
        value = getattr(settings, name)
        if not low <= value <= high:
            raise SettingsError(f"setting {name} is {value}; it must be between {low} and {high}")
    allowed_networks(settings.webhook_allowed_networks)  # a typo refused at start
    if settings.smtp_username and not (settings.smtp_starttls or settings.smtp_ssl):
        raise SettingsError(
            "smtp_username is set but neither smtp_starttls nor smtp_ssl: the password would "
            "cross the network in clear text"
        )
    return settings


def allowed_networks(setting: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The `webhook_allowed_networks` setting; SettingsError naming the entry it cannot read."""
    out = []
    for entry in filter(None, (e.strip() for e in setting.split(","))):
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise SettingsError(
                f"webhook_allowed_networks: {entry!r} is not an address or a network (CIDR)"
            ) from None
    return out


#: every numeric setting's allowed range (both ends included), checked when settings are loaded
RANGES: dict[str, tuple[float, float]] = {
    "cache_max_gb": (0, 1_000_000),  # 0: no limit
    "port": (1, 65_535),
    "ray_num_cpus": (1, 100_000),
    "max_archive_bytes": (2**20, 2**50),
    "max_archive_entries": (1, 10_000_000),
    "max_compression_ratio": (1, 1_000_000),
    "upload_chunk_max_bytes": (2**10, 2**32),
    "upload_session_ttl_s": (60, 365 * 86_400),
    "stream_interval_ms": (0, 1_000),  # 0: every token its own message
    "max_request_bytes": (2**10, 2**30),
    "smtp_port": (1, 65_535),
    "notify_max_attempts": (1, 100),
    "usage_retention_days": (0, 36_500),  # 0 keeps for ever, as for the two below
    "delivery_retention_days": (0, 36_500),
    "job_retention_days": (0, 36_500),
}


def _yaml_file(path: Path) -> Any:
    """A YAML file's value; SettingsError naming the file and line when it is not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SettingsError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None


#: a deviceType's resources: (required, what it must be, the check)
_PROFILE_FIELDS: dict[str, tuple[bool, str, Any]] = {
    "memory_gb": (True, "a number above 0", lambda v: _number(v) and v > 0),
    "num_cpus": (False, "a number, 0 or more", lambda v: _number(v) and v >= 0),
    "num_gpus": (False, "a number, 0 or more", lambda v: _number(v) and v >= 0),
    "gpu_memory_gb": (False, "a number above 0", lambda v: _number(v) and v > 0),
    "tensor_parallel_size": (False, "an integer, 1 or more", lambda v: _integer(v) and v >= 1),
    "pipeline_parallel_size": (False, "an integer, 1 or more", lambda v: _integer(v) and v >= 1),
    "device": (False, "cpu or cuda", lambda v: v in ("cpu", "cuda")),
    "accelerator_type": (False, "text", lambda v: isinstance(v, str)),
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@lru_cache
def hardware_profiles() -> dict[str, dict[str, Any]]:
    """deviceType -> resources of one replica (configs/hardware.yaml); SettingsError naming
    the deviceType and field that is wrong (checked when the platform starts)."""
    path = CONFIG_DIR / "hardware.yaml"
    profiles = _yaml_file(path)
    if not isinstance(profiles, dict) or not profiles:
        raise SettingsError(f"{path}: must map each deviceType to its resources")
    for name, profile in profiles.items():
        if not isinstance(profile, dict):
            raise SettingsError(f"{path}: {name}: must be a mapping of resources (memory_gb, ...)")
        for key, (required, what, ok) in _PROFILE_FIELDS.items():
            if key not in profile and not required:
                continue
            if key not in profile or not ok(profile[key]):
                got = f" (got {profile[key]!r})" if key in profile else ""
                raise SettingsError(f"{path}: {name}: {key} must be {what}{got}")
    return profiles
