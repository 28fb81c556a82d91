"""Settings: command-line flags > `I2V_*` environment > TOML file > defaults, validated once.

Every mistake becomes a `ConfigError` whose message is one line naming the key; the CLI prints
it and exits 78 (EX_CONFIG), which systemd treats as "do not restart in a loop".
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from i2v_daemon.errors import ConfigError
from i2v_daemon.locate import config_path, default_data_dir, read_toml, sqlite_url
from i2v_daemon.params import BUILTIN_PRESETS, NEEDS_LORA, Preset, PresetValues, lora_needed
from i2v_daemon.weights import TorchaoType, Weights, WeightsKind, shape_problem

#: What a JSON environment value looks like, per setting that takes a list or a table.
_JSON_EXAMPLES = {
    "resolution_ladder": "[768, 512]",
    "on_finish": '["/usr/local/bin/notify", "--quiet"]',
    "webhooks": '["https://example.org/hook"]',
    "notify": '["ntfy://ntfy.example.org/videos"]',
    "models": '{"svd": "stabilityai/stable-video-diffusion-img2vid-xt", "wan": {"model": "…", "weights": "fp8"}}',
    "presets": '{"social": {"output_fps": 24}}',
    "batch_roots": '["/srv/photos"]',
    "api_trusted_proxies": '["127.0.0.1"]',
}

#: The keys every preset has; a new one (not a built-in's name) must give them all.
PRESET_REQUIRED = ("resolution", "num_frames", "steps", "guidance_scale", "fps")

__all__ = ["BUILTIN_PRESETS", "Preset", "Settings", "config_path", "default_data_dir", "load_settings", "read_toml"]



class ModelEntry(BaseModel):
    """A `[models]` entry written as a table: the model and the weights it runs with (a plain string is the model)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    weights: WeightsKind | None = None  # None: the global `weights` (but gguf, whose file is `model`'s)
    weights_file: Path | None = None  # gguf: the .gguf file of this model's transformer
    torchao_type: TorchaoType | None = None  # torchao: None, the global `torchao_type`


_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("_toml_data", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """The already-parsed TOML file, ranked below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        data = _toml_data.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get() or {})


#: The paths that are `| None` in a config but always filled in by `Settings._derive`.
FilledPath = Literal["inbox_dir", "output_dir", "failed_dir", "work_dir", "metrics_textfile", "api_token_file"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="I2V_", extra="forbid", validate_default=True)

    # folders (INTERFACE.md §1)
    data_dir: Path = Field(default_factory=default_data_dir)
    inbox_dir: Path | None = None
    output_dir: Path | None = None
    failed_dir: Path | None = None
    work_dir: Path | None = None  # jobs in flight: <work_dir>/<job id>/ (inputs, log, partial video)
    database_url: str | None = None

    # the model
    model: str = "ali-vilab/i2vgen-xl"
    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    default_preset: str = "standard"
    presets: dict[str, PresetValues] = Field(default_factory=dict)
    resolution_ladder: list[int] = Field(default_factory=lambda: [1024, 896, 768, 640, 512, 384, 256])
    vram_budget_gib: float | None = Field(default=None, gt=0)  # cap on a card other programs share
    memory_margin: float = Field(default=0.10, ge=0, lt=0.9)  # headroom the memory model keeps free
    model_idle_unload_seconds: float = Field(default=1800.0, ge=0)  # 0 keeps the model loaded forever
    models: dict[str, ModelEntry] = Field(default_factory=dict)  # more models a sidecar may name; "default" is `model`
    max_loaded_models: int = Field(default=1, ge=1, le=16)  # on the CPU; on a GPU the VRAM budget decides
    lora_dir: Path | None = None  # the only folder a sidecar's `lora` is taken from; unset: no LoRA
    weights: WeightsKind = "auto"  # every model's, unless its `models` entry or the job's preset says otherwise
    weights_file: Path | None = None  # weights = "gguf": the .gguf file of `model`'s transformer
    torchao_type: TorchaoType = "int8wo"  # weights = "torchao": which quantization
    allow_fp8_fallback: bool = False  # `auto` weights may be stepped down to fp8 when the placement needs it

    # intake
    stable_seconds: float = Field(default=2.0, ge=0, le=3600)
    sidecar_wait_seconds: float = Field(default=10.0, ge=0, le=86400)
    rescan_seconds: float = Field(default=30.0, ge=1, le=86400)
    observer: Literal["auto", "native", "polling"] = "auto"
    poll_seconds: float = Field(default=2.0, ge=0.1, le=3600)
    max_image_pixels: int = Field(default=40_000_000, ge=1024)
    max_sidecar_bytes: int = Field(default=65536, ge=64, le=16 * 2**20)
    batch_roots: list[Path] = Field(default_factory=list)  # folders a batch manifest's absolute image paths may name
    max_batch_rows: int = Field(default=10_000, ge=1, le=1_000_000)

    # the queue
    max_attempts: int = Field(default=3, ge=1, le=100)
    lease_seconds: float = Field(default=60.0, ge=5, le=86400)
    retry_backoff_seconds: float = Field(default=30.0, ge=0, le=86400)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=86400)

    # logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"

    # running as a service: metrics, webhooks, retention (all off by default)
    metrics: Literal["off", "http", "textfile"] = "off"
    metrics_address: str = "127.0.0.1"  # http: where /metrics listens; keep it local, put a proxy in front
    metrics_port: int = Field(default=9464, ge=1, le=65535)
    metrics_textfile: Path | None = None  # textfile: default <data_dir>/metrics/i2v-daemon.prom
    webhooks: list[str] = Field(default_factory=list)  # http(s) URLs that get a JSON summary of each finished job
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    webhook_retries: int = Field(default=3, ge=0, le=20)
    webhook_secret: str | None = None  # "whsec_<base64>": webhooks carry Standard Webhooks signatures
    notify: list[str] = Field(default_factory=list)  # Apprise URLs told when a job ends (ntfy://, discord://, …)
    retention_days: float = Field(default=0, ge=0, le=36500)  # 0 = keep every job forever
    retention_action: Literal["forget", "archive"] = "forget"

    # liveness: a running job that shows no progress this long is stopped and retried
    stall_seconds: float = Field(default=900.0, ge=10, le=86400)

    # delivered frame rate (INTERFACE.md §5): defaults for jobs that do not say
    output_fps: int | None = Field(default=None, ge=1, le=120)  # None: the job's fps (no interpolation)
    interpolation: Literal["motion", "blend", "rife"] = "motion"
    rife_model: Path | None = None  # a local RIFE (IFNet) weights file; never downloaded

    # post-job hook (INTERFACE.md §6): an argv list, never a shell string
    on_finish: list[str] = Field(default_factory=list)
    on_finish_timeout_seconds: float = Field(default=60.0, gt=0, le=86400)

    # HTTP API and page (INTERFACE.md §7): `i2v-daemon serve`
    api_listen: str = "127.0.0.1:8765"
    api_token_file: Path | None = None  # default <data_dir>/api-token
    api_max_upload_bytes: int = Field(default=64 * 2**20, ge=1024, le=2**34)
    api_header_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)  # a request's line and headers, at most
    api_read_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)  # longest pause in a body
    api_max_connections: int = Field(default=1000, ge=16, le=1_000_000)  # lowered to fit the open-file limit
    api_trusted_proxies: list[str] = Field(default_factory=list)  # IPs/networks whose X-Forwarded-* are believed
    api_session_seconds: float = Field(default=7 * 86400, ge=60, le=366 * 86400)  # the page's sign-in lasts this

    # speed (INTERFACE.md §8)
    accelerate: Literal["auto", "on", "off"] = "auto"
    warm_up: bool = True  # with the fast path on: compile the presets' shapes at start, before the first job
    scheduler: Literal["default", "ddim", "dpm++"] = "default"  # default: the family's own
    cache: Literal["off", "first-block", "pab"] = "off"  # a step cache under every preset (transformer families)

    # provenance (INTERFACE.md §10): a signed C2PA manifest in every published video and poster
    provenance: Literal["c2pa", "off"] = "c2pa"
    c2pa_cert: Path | None = None  # PEM chain, signing certificate first; unset: a self-made one in <data_dir>/c2pa
    c2pa_key: Path | None = None  # its PEM private key (unencrypted)
    c2pa_tsa_url: str | None = None  # an RFC 3161 timestamp authority; unset: no timestamp

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _model_strings(cls, v: Any) -> Any:
        # `NAME = "repo id or folder"` is the short form of `NAME = { model = "…" }`.
        if isinstance(v, dict):
            return {name: {"model": entry} if isinstance(entry, str) else entry for name, entry in v.items()}
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name, entry in v.items():
            if name == "default":
                raise ValueError("'default' is always the `model` setting; give this one another name")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"{name!r} is not a usable name (letters, digits, '.', '_', '-')")
            if not entry.model.strip():
                raise ValueError(f"models.{name} is empty; give a Hub repo id or a diffusers folder")
        return v

    @field_validator("rife_model", mode="before")
    @classmethod
    def _rife_model(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # `rife_model = ""`: not set (not ".")

    @field_validator("lora_dir")
    @classmethod
    def _lora_dir(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, v: str) -> str:
        import ipaddress

        if v != "localhost":
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError("must be an IP address such as 127.0.0.1 (or localhost)") from None
        return v

    @field_validator("metrics_textfile")
    @classmethod
    def _metrics_textfile(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix != ".prom":
            raise ValueError("must end in .prom (node_exporter's textfile collector reads only those)")
        return v

    @field_validator("api_trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network such as 127.0.0.1 or 10.0.0.0/8") from None
        return v

    @field_validator("webhooks")
    @classmethod
    def _webhooks(cls, v: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return v

    @field_validator("c2pa_tsa_url")
    @classmethod
    def _tsa(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None or not v.strip():
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL of a timestamp authority")
        return v

    @field_validator("c2pa_cert", "c2pa_key", mode="before")
    @classmethod
    def _pem_path(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _webhook_secret(cls, v: Any) -> Any:
        import base64
        import binascii

        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str):
            return v
        raw = v.strip().removeprefix("whsec_")
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) < 24:
            raise ValueError(
                "must be 'whsec_' followed by at least 24 random bytes in base64, e.g. the output of "
                "`python3 -c \"import base64,os;print('whsec_'+base64.b64encode(os.urandom(32)).decode())\"`"
            )
        return v.strip()

    @field_validator("notify")
    @classmethod
    def _notify(cls, v: list[str]) -> list[str]:
        for url in v:
            problem = notify_url_problem(url)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("resolution_ladder")
    @classmethod
    def _ladder(cls, v: list[int]) -> list[int]:
        if not v or any(r < 16 for r in v):
            raise ValueError("must be a non-empty list of short sides of at least 16 pixels")
        return sorted(set(v), reverse=True)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        self.inbox_dir = (self.inbox_dir or self.data_dir / "inbox").expanduser()
        self.output_dir = (self.output_dir or self.data_dir / "output").expanduser()
        self.failed_dir = (self.failed_dir or self.data_dir / "failed").expanduser()
        self.work_dir = (self.work_dir or self.data_dir / "work").expanduser()
        if self.database_url is None:
            self.database_url = sqlite_url(self.data_dir / "jobs.db")  # escaped: any path, `?` and `%` too
        self.metrics_textfile = (self.metrics_textfile or self.data_dir / "metrics" / "i2v-daemon.prom").expanduser()
        self.api_token_file = (self.api_token_file or self.data_dir / "api-token").expanduser()
        if self.rife_model is not None:
            self.rife_model = self.rife_model.expanduser()
        self.batch_roots = [p.expanduser() for p in self.batch_roots]
        for root in self.batch_roots:
            if not root.is_absolute():
                raise ValueError(f"batch_roots: {str(root)!r} is not an absolute path; name each folder in full")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            given, absent = ("c2pa_cert", "c2pa_key") if self.c2pa_cert is not None else ("c2pa_key", "c2pa_cert")
            raise ValueError(
                f"{absent}: {given} is set but {absent} is not; give both (the certificate chain and its key), "
                "or neither to sign with a self-made certificate"
            )
        self.c2pa_cert = self.c2pa_cert.expanduser() if self.c2pa_cert is not None else None
        self.c2pa_key = self.c2pa_key.expanduser() if self.c2pa_key is not None else None
        for name, override in self.presets.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(
                    f"presets.{name}: {name!r} is not a usable preset name (letters, digits, '.', '_', '-'); "
                    "it also names the preset's inbox folder"
                )
            merged = {**(BUILTIN_PRESETS[name].model_dump() if name in BUILTIN_PRESETS else {})}
            merged.update(override.values())
            missing = [k for k in PRESET_REQUIRED if k not in merged]
            if missing:
                raise ValueError(
                    f"presets.{name}: a new preset needs {', '.join(PRESET_REQUIRED)}; "
                    f"it lacks {', '.join(missing)} (or copy a built-in one: fast, standard, high)"
                )
            for url in override.notify or []:
                problem = notify_url_problem(url)
                if problem:
                    raise ValueError(f"presets.{name}.notify: {problem}")
            try:
                preset = Preset(**merged)
            except ValidationError as err:
                raise ValueError(_first_error(err, prefix=f"presets.{name}")) from None
            if preset.output_fps is not None and preset.output_fps < preset.fps:
                raise ValueError(
                    f"presets.{name}.output_fps: {preset.output_fps} is below the preset's fps = {preset.fps}; "
                    f"the delivered rate cannot be lower than the generated one: use {preset.fps} or more"
                )
            if preset.interpolation == "rife" and self.rife_model is None:
                raise ValueError(
                    f"presets.{name}.interpolation: 'rife' needs rife_model, a local RIFE weights file "
                    "(it is never downloaded); set it, or choose 'motion' or 'blend'"
                )
            if preset.lora is not None and self.lora_dir is None:
                raise ValueError(
                    f"presets.{name}.lora: {preset.lora!r} is read from lora_dir, which is not set; set lora_dir "
                    "to the folder that holds it"
                )
            if preset.lora_scale is not None and preset.lora is None:
                raise ValueError(f"presets.{name}.lora_scale: is set but the preset has no lora; set lora too")
        self._check_weights()
        if self.interpolation == "rife" and self.rife_model is None:
            raise ValueError(
                "rife_model: interpolation = 'rife' needs rife_model, a local RIFE weights file "
                "(it is never downloaded); set it, or choose interpolation = 'motion' or 'blend'"
            )
        if self.default_preset not in self.all_presets():
            raise ValueError(
                f"default_preset: {self.default_preset!r} is not a preset "
                f"(known: {', '.join(sorted(self.all_presets()))})"
            )
        if self.default_preset in NEEDS_LORA and self.all_presets()[self.default_preset].lora is None:
            raise ValueError(f"default_preset: {lora_needed(self.default_preset)}, or choose another default_preset")
        return self

    def _check_weights(self) -> None:
        """Every model's weights can be had as configured, and every preset's `weights` can apply to any model."""
        if self.weights_file is not None:
            self.weights_file = self.weights_file.expanduser()
        checks: list[tuple[str, str, Path | None]] = [("weights", self.weights, self.weights_file)]
        for name, entry in self.models.items():
            if entry.weights_file is not None:
                entry.weights_file = entry.weights_file.expanduser()
            if entry.weights is not None or entry.weights_file is not None:
                checks.append((f"models.{name}.weights", self.entry_weights(entry).kind, entry.weights_file))
        for key, kind, file in checks:
            said = shape_problem(kind, file, key)  # the package and the file: where the model runs (daemon.py)
            if said:
                raise ValueError(said)
        for name, override in self.presets.items():
            asked = override.weights
            if asked == "gguf":
                raise ValueError(
                    f"presets.{name}.weights: 'gguf' loads one model's own file, so a preset cannot ask for it; "
                    "set weights = 'gguf' with weights_file for that model (globally for `model`, or in its "
                    "`models` entry), and use 'auto', 'fp8' or 'torchao' in presets"
                )

    def entry_weights(self, entry: ModelEntry) -> Weights:
        """The weights a `[models]` entry runs with: its own, else the global ones (gguf's file is `model`'s only)."""
        kind = entry.weights or ("auto" if self.weights == "gguf" else self.weights)
        file = str(entry.weights_file) if entry.weights_file is not None else None
        return Weights(kind, file, entry.torchao_type or self.torchao_type)

    def model_weights(self) -> dict[str, Weights]:
        """The weights of every model a sidecar may name, by name ("default" is `model`)."""
        own = Weights(self.weights, str(self.weights_file) if self.weights_file is not None else None,
                      self.torchao_type)
        return {**{name: self.entry_weights(entry) for name, entry in self.models.items()}, "default": own}

    def all_presets(self) -> dict[str, Preset]:
        """Built-in presets with the TOML's `[presets.*]` tables merged over them."""
        out = dict(BUILTIN_PRESETS)
        for name, override in self.presets.items():
            base = BUILTIN_PRESETS[name].model_dump() if name in BUILTIN_PRESETS else {}
            out[name] = Preset(**{**base, **override.values()})
        return out

    def notify_for(self, preset: str | None) -> list[str]:
        """The Apprise URLs told of a job of this preset: the config's `notify`, then the preset's own."""
        table = self.presets.get(preset) if preset is not None else None
        own = (table.notify or []) if table is not None else []
        return list(dict.fromkeys([*self.notify, *own]))

    def job_defaults(self) -> dict[str, Any]:
        """Config-level defaults under every preset: the delivered frame rate, how to interpolate, the scheduler,
        the step cache."""
        return {"output_fps": self.output_fps, "interpolation": self.interpolation, "scheduler": self.scheduler,
                "cache": self.cache}

    def model_choices(self) -> dict[str, str]:
        """Every model a sidecar may name: the `[models]` table and "default" (the `model` setting)."""
        return {**{name: entry.model for name, entry in self.models.items()}, "default": self.model}

    def folders(self) -> dict[str, Path]:
        """The four folders by setting name (all set once validated)."""
        out = {"inbox_dir": self.inbox_dir, "output_dir": self.output_dir, "failed_dir": self.failed_dir,
               "work_dir": self.work_dir}
        return {k: v for k, v in out.items() if v is not None}

    @overload
    def filled(self, name: FilledPath) -> Path: ...
    @overload
    def filled(self, name: Literal["database_url"]) -> str: ...
    def filled(self, name: FilledPath | Literal["database_url"]) -> Path | str:
        """A setting declared `| None` (so a config may leave it out) that `_derive` always fills in.

        On validated settings it is never None; this says so to the type checker, and fails loudly on
        settings that skipped validation (`model_construct`) instead of passing None along.
        """
        value: Path | str | None = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{name} is unset: these settings were not validated (Settings._derive fills it in)")
        return value


def notify_url_problem(url: str) -> str | None:
    """Why Apprise cannot use `url` (shown without its secrets), or None when it can."""
    import re as _re

    shown = _re.sub(r"(://)[^/@]*@", r"\1…@", url)[:80]
    if "://" not in url:
        return f"{shown!r} is not an Apprise URL (such as ntfy://HOST/TOPIC or discord://ID/TOKEN)"
    import apprise  # only when notifications are configured: it takes a quarter of a second to import

    if apprise.Apprise.instantiate(url, suppress_exceptions=True) is None:
        scheme = url.split("://", 1)[0]
        return (f"{shown!r} is not a URL Apprise understands (scheme {scheme!r}, or its parts); see "
                "https://github.com/caronc/apprise/wiki for each service's form")
    return None


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Build the settings once; raises ConfigError with one line naming the offending key."""
    path = config_path(config)
    data = read_toml(path) if path else {}
    token = _toml_data.set(data)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"config: {_all_errors(err)}{where}") from None
    except SettingsError as err:  # an I2V_* value that should be JSON (a list or a table) is not
        match = re.search(r'field "(\w+)"', str(err))
        key = match.group(1) if match else "settings"
        raise ConfigError(
            f"config: {key} / I2V_{key.upper()}: the environment value must be JSON, e.g. "
            f"I2V_{key.upper()}='{_JSON_EXAMPLES.get(key, '[...]')}'"
        ) from None
    finally:
        _toml_data.reset(token)


def _all_errors(err: ValidationError) -> str:
    """Every mistake in the settings, on one line (a file with two typos says both, not one per try)."""
    said = list(dict.fromkeys(_one_error(e) for e in err.errors()))
    return said[0] if len(said) == 1 else f"{len(said)} mistakes: " + "; ".join(said)


def _first_error(err: ValidationError, prefix: str = "") -> str:
    return _one_error(err.errors()[0], prefix)


def _close_key(loc: tuple[Any, ...]) -> str | None:
    """The known key nearest an unknown one at `loc` (top level, or in a table such as presets.NAME)."""
    import difflib
    import typing

    from pydantic import BaseModel

    model: Any = Settings
    parts = [str(p) for p in loc[:-1]]
    while parts:
        field = model.model_fields.get(parts.pop(0))
        if field is None:
            return None
        kind = field.annotation
        if typing.get_origin(kind) is dict:  # presets.NAME: the NAME is the table's own
            kind = typing.get_args(kind)[1]
            parts = parts[1:]
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return None
        model = kind
    return next(iter(difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)), None)


def _one_error(e: Any, prefix: str = "") -> str:
    key = ".".join(str(p) for p in e["loc"]) or prefix
    if prefix and not key.startswith(prefix):
        key = f"{prefix}.{key}" if key else prefix
    if e["type"] == "extra_forbidden":
        guess = _close_key(tuple(key.split(".")))
        if guess:
            return f"{key}: unknown setting — did you mean '{guess}'?"
        return f"{key}: unknown setting (check the spelling; config/config.toml lists every key)"
    msg = str(e["msg"]).removeprefix("Value error, ")
    if not e["loc"] and not prefix:
        return msg  # a model-level check already names its key
    env = f" / I2V_{key.upper()}" if key and "." not in key else ""
    got = e.get("input")
    shown = f", got {got!r}" if got is not None and not isinstance(got, dict | list) else ""
    return f"{key or 'settings'}{env}: {msg}{shown}"
