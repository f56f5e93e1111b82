"""Settings: one YAML file overlaid by environment variables, validated at start."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.zones import Zone, ZoneError, check_unique_ids

DEFAULT_CONFIG_PATH = Path("config/mvp.yaml")

# Environment names operators already use in their .env files, mapped to settings paths.
LEGACY_ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "DEVICE_ID": ("device_id",),
    "PARKMON_DATA_DIR": ("data_dir",),
    "LOG_LEVEL": ("log_level",),
    "AWS_REGION": ("aws", "region"),
    "S3_DATA_BUCKET": ("aws", "data_bucket"),
    "S3_METADATA_BUCKET": ("aws", "metadata_bucket"),
    "S3_ENDPOINT_URL": ("aws", "s3_endpoint_url"),
    "API_GATEWAY_ENDPOINT": ("aws", "api_endpoint"),
    "API_GATEWAY_KEY": ("aws", "api_key"),
    "PARKING_MONITOR_PORT": ("api", "port"),
    "CAMERA_SOURCE": ("camera_source",),
    "MAX_BATCH_SIZE": ("upload", "batch_size"),
    "UPLOAD_INTERVAL": ("upload", "interval"),
    "MAX_RETRIES": ("upload", "max_retries"),
    "MAX_CONCURRENT_UPLOADS": ("upload", "max_concurrent"),
    "SNAPSHOT_INTERVAL": ("processing", "snapshot_interval"),
    "CONFIDENCE_THRESHOLD": ("detection", "confidence"),
    "PARKMON_MODEL": ("detection", "model"),
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    """Base for config blocks: unknown keys are refused so typos surface."""

    model_config = ConfigDict(extra="forbid")


class CameraSettings(Section):
    """One camera: where frames come from, their size, and the spaces it watches."""

    id: str = Field(
        default="cam0",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Camera id, unique on the device; letters, digits, . _ - (it names snapshot files).",
    )
    source: str = Field(default="0", description="Camera index, RTSP/HTTP URL, video file or image folder.")
    width: int = Field(default=1280, gt=0, description="Frame width the zones were drawn for, px.")
    height: int = Field(default=720, gt=0, description="Frame height the zones were drawn for, px.")
    fps: float = Field(default=30, gt=0, description="Frame rate asked of a live camera.")
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality of stored snapshots.")
    parking_zones: list[Zone] = Field(default_factory=list, description="The spaces this camera watches.")

    @model_validator(mode="after")
    def _unique_zone_ids(self) -> CameraSettings:
        """Refuse two zones with the same id on one camera."""
        check_unique_ids(self.parking_zones)
        return self


class DetectionSettings(Section):
    """Vehicle detector settings."""

    model: str = Field(default="yolo11m.pt", description="Path of the YOLO weights.")
    confidence: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Minimum box confidence; small distant cars score low, the overlap rule rejects strays.",
    )
    classes: list[int] = Field(default=[2, 3, 5, 7], description="COCO classes that count as vehicles.")
    device: str = Field(default="auto", description="auto (MPS, else CUDA, else CPU), mps, cuda or cpu.")
    image_size: int = Field(default=640, gt=0, description="Model input size for the full-frame pass, px.")
    tile_size: int = Field(
        default=672, ge=0, description="Side of one tile in the model input, px; 0 turns tiling off."
    )
    tile_zone_px: float = Field(
        default=64.0, gt=0.0, description="Side a typical small zone is magnified to in a tile's input, px."
    )
    tile_max_scale: float = Field(
        default=3.0, gt=0.0, description="Most a tile is magnified, model px per frame px."
    )
    tile_zones_below_px: float = Field(
        default=32.0, ge=0.0,
        description="Tile around zones whose side (root of area) in the full-frame input is below this, px.",
    )
    tile_overlap: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Share of a tile its neighbour covers."
    )
    merge_iou: float = Field(default=0.5, gt=0.0, le=1.0, description="Boxes overlapping this much are one.")
    merge_containment: float = Field(
        default=0.8, gt=0.0, le=1.0, description="A box this much inside a stronger one is the same vehicle."
    )
    ground_fraction: float = Field(
        default=0.6, gt=0.0, le=1.0, description="Bottom share of a box taken as where the vehicle stands."
    )
    occupied_overlap: float = Field(
        default=0.3, gt=0.0, le=1.0,
        description="Share of the smaller of space and ground area a vehicle must cover to occupy the space.",
    )
    min_space_cover: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Least share of a space a vehicle must cover to fill it."
    )


class ProcessingSettings(Section):
    """Snapshot cadence and temporal smoothing."""

    snapshot_interval: float = Field(default=5.0, gt=0, description="Seconds between snapshots per camera.")
    temporal_smoothing: bool = True
    smoothing_window: int = Field(default=3, ge=1, description="Snapshots a state change must persist.")
    smoothing_sure_confidence: float = Field(
        default=0.75, ge=0.5, le=1.0, description="A change observed at least this sure is taken at once."
    )
    smoothing_max_gap_s: float = Field(
        default=60.0, gt=0, description="Snapshots further apart than this share no history for smoothing."
    )


class ApiSettings(Section):
    """Status API server."""

    host: str = "127.0.0.1"
    port: int = Field(default=9091, gt=0, lt=65536)
    enable_cors: bool = False


class UploadSettings(Section):
    """Upload stage behaviour."""

    enabled: bool = True
    batch_size: int = Field(
        default=10, ge=1, description="Jobs claimed per round = most records in one ingest request."
    )
    interval: float = Field(default=60, ge=0, description="Seconds between upload rounds when idle.")
    compression: bool = True
    max_retries: int = Field(default=3, ge=1, description="Fast retries before a job is parked as failed.")
    max_concurrent: int = Field(default=5, ge=1, description="Uploads in flight at once.")
    retry_base_s: float = Field(default=2.0, gt=0, description="First retry delay, doubled each attempt.")
    retry_cap_s: float = Field(default=300.0, gt=0, description="Longest delay between fast retries.")
    parked_retry_s: float = Field(default=900.0, gt=0, description="Delay between retries of a parked job.")
    request_timeout_s: float = Field(default=30.0, gt=0)
    checksum: Literal["when_required", "when_supported"] = Field(
        default="when_required",
        description="botocore request checksums; when_required works with AWS and S3-compatible servers.",
    )
    keyframe_every: int = Field(
        default=60, ge=1, description="Records per camera between full-state keyframes; deltas in between."
    )
    keyframe_gap_s: float = Field(
        default=900.0, gt=0, description="A camera silent this long (capture time) restarts with a keyframe."
    )
    images: Literal["all", "changed", "every_nth"] = Field(
        default="all", description="Which JPEGs go to the data bucket: all, occupancy changes, or every Nth."
    )
    image_every_n: int = Field(default=10, ge=1, description="With images: every_nth, one JPEG in N a camera.")
    jpeg_quality: int | None = Field(
        default=None, ge=1, le=100, description="Re-encode JPEGs at this quality; unset sends them as they are."
    )
    max_bytes_per_s: int | None = Field(
        default=None, gt=0, description="Upload bandwidth cap, bytes per second averaged; unset means none."
    )
    multipart_threshold_bytes: int = Field(
        default=8 * 1024**2, ge=5 * 1024**2, description="Objects this large go up as S3 multipart uploads."
    )
    multipart_part_bytes: int = Field(
        default=8 * 1024**2, ge=5 * 1024**2, description="Part size of a multipart upload (S3 minimum 5 MiB)."
    )


class AwsSettings(Section):
    """Cloud destinations; credentials come from boto3's own chain, never from here."""

    region: str = "us-west-2"
    data_bucket: str = "parking-monitor-data-production"
    metadata_bucket: str = "parking-monitor-metadata-production"
    s3_endpoint_url: str | None = Field(default=None, description="For S3-compatible servers.")
    api_endpoint: str | None = Field(default=None, description="Ingest API base URL; POSTs to /detections.")
    api_key: SecretStr | None = Field(default=None, description="Sent as X-API-Key.")


class DatabaseSettings(Section):
    """SQLite job table settings."""

    lease_s: float = Field(default=120.0, gt=0, description="How long a claimed job stays owned.")
    busy_timeout_s: float = Field(default=30.0, gt=0, description="How long a writer waits for the lock.")
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = Field(
        default="FULL", description="SQLite synchronous mode; OFF is refused."
    )


class RetentionSettings(Section):
    """How long snapshots are kept on the device, and how much disk space is kept free."""

    days: float = Field(default=30, gt=0, description="Uploaded snapshots older than this are deleted.")
    min_free_bytes: int = Field(
        default=2 * 1024**3, ge=0, description="Free space kept on the snapshot disk, oldest uploaded first."
    )
    check_interval_s: float = Field(default=60, gt=0, description="Seconds between retention passes.")


def _default_device_id() -> str:
    """The host name, without a domain part."""
    return socket.gethostname().split(".")[0] or "parkmon"


class _YamlSource(PydanticBaseSettingsSource):
    """Settings read from the YAML file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class _LegacyEnvironmentSource(PydanticBaseSettingsSource):
    """Settings from the flat .env names of the earlier design."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, path in LEGACY_ENVIRONMENT.items():
            raw = os.environ.get(name)
            if raw is None or raw == "":
                continue
            target = values
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = raw
        return values


class Settings(BaseSettings):
    """Everything one parkmon device needs to run its four stages."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="PARKMON_", env_nested_delimiter="__")

    device_id: str = Field(
        default_factory=_default_device_id,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Carried in every record; letters, digits, . _ - (it names snapshot files and S3 keys).",
    )
    data_dir: Path = Field(default=Path("var"), description="Database, snapshots and logs live here.")
    log_level: str = "INFO"
    cameras: list[CameraSettings] = Field(default_factory=lambda: [CameraSettings()])
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    upload: UploadSettings = Field(default_factory=UploadSettings)
    aws: AwsSettings = Field(default_factory=AwsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    config_path: Path | None = Field(default=None, description="The YAML file these settings came from.")

    @model_validator(mode="before")
    @classmethod
    def _read_single_camera_format(cls, data: Any) -> Any:
        """Turn the earlier one-camera layout (camera: + parking_zones:) into cameras:."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        camera = data.pop("camera", None)
        zones = data.pop("parking_zones", None)
        source_override = data.pop("camera_source", None)
        if camera is not None or zones is not None:
            if data.get("cameras"):
                raise ValueError("use either cameras: or camera:/parking_zones:, not both")
            single = dict(camera or {})
            single.setdefault("id", "cam0")
            single["parking_zones"] = zones or []
            data["cameras"] = [single]
        if source_override is not None:
            cameras = data.get("cameras") or [{"id": "cam0"}]
            if len(cameras) != 1:
                raise ValueError("CAMERA_SOURCE applies to a single camera; this file lists several")
            data["cameras"] = [{**cameras[0], "source": source_override}]
        return data

    @model_validator(mode="after")
    def _unique_camera_ids(self) -> Settings:
        """Refuse two cameras with the same id."""
        ids = [camera.id for camera in self.cameras]
        duplicates = sorted({camera_id for camera_id in ids if ids.count(camera_id) > 1})
        if duplicates:
            raise ValueError(f"duplicate camera id {duplicates[0]!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_data = init_settings.init_kwargs.pop("_yaml", {})  # type: ignore[attr-defined]
        return (
            init_settings,
            env_settings,
            _LegacyEnvironmentSource(settings_cls),
            _YamlSource(settings_cls, yaml_data),
        )

    @property
    def database_path(self) -> Path:
        """The one SQLite file all stages share."""
        return self.data_dir / "parkmon.db"

    @property
    def snapshots_dir(self) -> Path:
        """Root of the dated snapshot folders."""
        return self.data_dir / "snapshots"

    def camera(self, camera_id: str) -> CameraSettings:
        """The camera with this id."""
        for camera in self.cameras:
            if camera.id == camera_id:
                return camera
        raise KeyError(camera_id)


def config_path_from_environment(path: str | Path | None = None) -> Path:
    """The config file to read: the argument, else PARKMON_CONFIG, else config/mvp.yaml."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("PARKMON_CONFIG") or DEFAULT_CONFIG_PATH)


def _describe_location(raw: dict[str, Any], location: tuple[int | str, ...]) -> str:
    """Render a pydantic error location, naming camera and zone ids where it points into them."""
    parts: list[str] = []
    cameras = raw.get("cameras") if isinstance(raw.get("cameras"), list) else None
    index = 0
    while index < len(location):
        key = location[index]
        following = location[index + 1] if index + 1 < len(location) else None
        if key == "cameras" and isinstance(following, int) and cameras and following < len(cameras):
            camera = cameras[following]
            camera_id = camera.get("id", "cam0") if isinstance(camera, dict) else following
            parts.append(f"camera {camera_id!r}")
            index += 2
            continue
        if key == "parking_zones" and isinstance(following, int):
            camera_zones = None
            if parts and cameras:
                camera_index = location[index - 1]
                if isinstance(camera_index, int) and isinstance(cameras[camera_index], dict):
                    camera_zones = cameras[camera_index].get("parking_zones")
            zone_id: Any = following
            if isinstance(camera_zones, list) and following < len(camera_zones):
                zone = camera_zones[following]
                if isinstance(zone, dict) and zone.get("id") is not None:
                    zone_id = zone["id"]
            parts.append(f"zone {str(zone_id)!r}")
            index += 2
            continue
        parts.append(str(key))
        index += 1
    return " ".join(parts)


def _format_validation_error(path: Path, raw: dict[str, Any], error: ValidationError) -> str:
    """One message naming the file, where in it, and why."""
    first = error.errors()[0]
    location = tuple(first["loc"])
    try:
        normalised = Settings._read_single_camera_format(raw)
    except ValueError:
        normalised = raw
    where = _describe_location(normalised, location)
    reason = first["msg"].removeprefix("Value error, ")
    for name, settings_path in LEGACY_ENVIRONMENT.items():
        if os.environ.get(name) and location[: len(settings_path)] == settings_path:
            return f"environment {name}={os.environ[name]!r}: {where}: {reason}"
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ZoneError):
        reason = str(cause)
        where = where.rsplit(" zone ", 1)[0] if " zone " in where else where
    message = f"{path}: {where}: {reason}" if where else f"{path}: {reason}"
    extra = len(error.errors()) - 1
    return message + (f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else "")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping or raise ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror or error})") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings every stage runs with; raise ConfigError if unusable."""
    config_path = config_path_from_environment(path)
    raw = read_yaml(config_path)
    try:
        settings = Settings(_yaml=raw, config_path=config_path, **overrides)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(config_path, raw, error)) from None
    except ValueError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    settings.data_dir = settings.data_dir.expanduser().resolve()
    return settings
