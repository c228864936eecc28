"""Configuration: /etc-style YAML files validated into frozen, typed pydantic models.

Where the configuration comes from
----------------------------------
``/etc/dicomd/dicomd.yaml`` (or the file given with ``--config PATH``), then every
``*.yaml`` file in the ``conf.d`` directory beside it, in name order (``10-tls.yaml`` before
``20-peers.yaml``). Files whose name starts with a dot are skipped (editor and lock files);
``*.yml`` files are skipped with a warning, because that is almost always a typo. Without
``--config`` and without ``/etc/dicomd/dicomd.yaml``, dicomd runs on the embedded development
defaults (:func:`development_defaults`).

How conf.d files merge
----------------------
- Mappings merge key by key, recursively (``limits:`` in two files gives one ``limits``).
- A scalar (or a list that is not one of the named lists below) set in a later file replaces
  the earlier value.
- Lists of named items are concatenated, in file order: ``listeners`` (identified by
  ``name``), ``local_aes`` (by ``ae_title``), ``peers`` (by ``name``), ``worklist_sources``
  (by ``name``) and ``access.rules`` (by ``name``; first match wins, so rules from later files
  come after earlier ones). An identity defined twice, in one file or across files, is an
  error naming both places: a later file cannot silently redefine a peer.
- A key that is a mapping in one file and a scalar or list in another is an error naming both
  places; so is a named list given as anything but a list.

Every value keeps the file, line and column it came from through the merge, so each error
names ``file:line:column: key.path[index]: message``, and all errors are reported at once.

YAML dialect
------------
Scalars follow the YAML 1.2 core schema rather than PyYAML's YAML 1.1 defaults: only
``true``/``false`` are booleans (an AE title ``NO`` stays the string ``NO``; ``yes``/``no``/
``on``/``off`` are still accepted where a boolean is expected), ``0104`` is 104 and not octal,
``1:30`` is a string and not 90, and dates stay strings. Anchors, aliases and ``<<`` merge keys
work; duplicate keys in one mapping are errors (PyYAML would silently keep the last).

Validation
----------
The merged data is validated by pydantic models that are all ``extra="forbid"`` and frozen.
``local_aes[].services`` depends on the installed service plug-ins, so the models used for
validation are subclasses built per plug-in registry (:func:`config_model`); the static
classes below are what the rest of dicomd types against. Validate through
:func:`load_config` or :func:`parse_config`, which also run the checks that span the whole
configuration (duplicate names, references between sections, permission verbs).
"""

from __future__ import annotations

import difflib
import functools
import keyword
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path, PurePath
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dicomd.services.base import ServiceOptions
from dicomd.services.registry import Registry, discover

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AETitle",
    "Access",
    "AccessRule",
    "Archive",
    "Config",
    "ConfigError",
    "Finding",
    "Limits",
    "Listener",
    "ListenerTLS",
    "LoadedConfig",
    "LocalAE",
    "Logging",
    "Peer",
    "PeerTLS",
    "RunAs",
    "Services",
    "WorklistSource",
    "WorklistSourceRef",
    "check_config",
    "config_model",
    "development_defaults",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/dicomd/dicomd.yaml")
CONF_D_NAME = "conf.d"

# Permission verbs a peer or an access rule may name even when the service that uses them is
# not installed: a configuration written for the full suite must stay valid on a smaller one.
BASE_PERMISSIONS = frozenset(
    {"echo", "store", "find", "move", "get", "worklist", "commitment", "mpps"}
)

# Lists whose items are merged across conf.d files by identity, and the key that identifies
# an item. The words are how errors name the identity.
NAMED_LISTS: dict[tuple[str, ...], tuple[str, str]] = {
    ("listeners",): ("name", "listener name"),
    ("local_aes",): ("ae_title", "AE title"),
    ("peers",): ("name", "peer name"),
    ("worklist_sources",): ("name", "worklist source name"),
    ("access", "rules"): ("name", "access rule name"),
}

LAYOUT_PLACEHOLDERS = frozenset(
    {
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "Modality",
        "StudyDate",
    }
)


# --------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Finding:
    """One problem in the configuration, printable as ``file:line:col: key.path: message``."""

    file: str | None
    line: int | None
    column: int | None
    key_path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            parts.append(where)
        if self.severity == "warning":
            parts.append("warning")
        if self.key_path:
            parts.append(self.key_path)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The configuration is not usable; ``findings`` lists every problem found (and warnings)."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("\n".join(str(f) for f in self.findings))


# --------------------------------------------------------------------------------------------
# Value types


def _quote(value: str) -> str:
    """A string as errors show it: in single quotes, control characters escaped.

    Not repr(): an admin reading 'AE\\\\X' for the AE title AE\\X would hunt for two backslashes.
    """
    escaped = "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in value
    )
    return f"'{escaped}'"


def _describe(value: object) -> str:
    """A value as errors show it, in YAML terms rather than Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return _quote(str(value))


def _reject_bool(kind: str) -> Any:
    # pydantic's lax mode reads true as 1; a port or a timeout written as `yes` is a mistake.
    def check(value: object) -> object:
        if isinstance(value, bool):
            raise PydanticCustomError(
                "dicomd", "{message}", {"message": f"expected {kind}, got {_describe(value)}"}
            )
        return value

    return BeforeValidator(check)


Int = Annotated[int, _reject_bool("an integer")]
Float = Annotated[float, _reject_bool("a number")]
Port = Annotated[int, _reject_bool("an integer"), Field(ge=1, le=65535)]
NonEmptyStr = Annotated[str, Field(min_length=1)]

AE_TITLE_MAX_LENGTH = 16


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is the default character repertoire without backslash and control
    # characters, at most 16 characters; leading and trailing spaces are not significant.
    if value == "":
        raise ValueError("AE title must not be empty")
    if value.strip(" ") == "":
        raise ValueError(f"AE title {_quote(value)} must not be only spaces")
    title = value.strip(" ")
    if "\\" in title:
        raise ValueError(f"AE title {_quote(value)} must not contain a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in title):
        raise ValueError(f"AE title {_quote(value)} must not contain control characters")
    if not title.isascii():
        raise ValueError(f"AE title {_quote(value)} must contain only ASCII characters")
    if len(title) > AE_TITLE_MAX_LENGTH:
        raise ValueError(f"{_quote(title)} is longer than {AE_TITLE_MAX_LENGTH} characters")
    return title


AETitle = Annotated[str, AfterValidator(_check_ae_title)]

_GLOB_CHARS = frozenset("*?[")


def _check_ae_pattern(value: str) -> str:
    """An AE title or an fnmatch glob over AE titles (only the length rule cannot apply)."""
    if any(ch in _GLOB_CHARS for ch in value):
        pattern = value.strip(" ")
        if pattern == "" or "\\" in pattern or not pattern.isprintable() or not pattern.isascii():
            raise ValueError(f"{_quote(value)} is not a valid AE title pattern")
        return pattern
    return _check_ae_title(value)


AETitlePattern = Annotated[str, AfterValidator(_check_ae_pattern)]

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _check_address(value: str) -> str:
    address = value.strip()
    literal = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        return str(ip_address(literal))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", address):
        # All digits and dots is an IPv4 address attempt, not a host name.
        raise ValueError(f"{_quote(value)} is not a valid IPv4 address")
    host = address[:-1] if address.endswith(".") else address
    if host and len(host) <= 253 and all(_HOST_LABEL.match(lab) for lab in host.split(".")):
        return address
    raise ValueError(f"{_quote(value)} is neither an IP address nor a valid host name")


Address = Annotated[str, AfterValidator(_check_address)]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_name(value: str) -> str:
    # Listener names become systemd socket FileDescriptorName= values and log fields.
    if not _NAME.match(value):
        raise ValueError(f"name {_quote(value)} may contain only letters, digits, '_', '.' and '-'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _parse_network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if isinstance(value, IPv4Address | IPv6Address):
        return ip_network(value)
    if not isinstance(value, str):
        raise ValueError(f"expected an address or a network, got {_describe(value)}")
    try:
        # strict=False: 10.1.2.3/16 means 10.1.0.0/16, as in hosts.allow and firewalls.
        return ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{_quote(value)} is not an IP address or network (such as 10.1.0.0/16 or fd00::/8)"
        ) from None


# A PlainValidator rather than a union: a union makes pydantic report one error per member.
Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_parse_network)]


def _tls_version(value: object) -> object:
    # `min_version: 1.2` unquoted is a YAML float.
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.1f}"
    return value


TLSVersion = Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)]
TLSProfile = Literal["bcp195", "bcp195-nd", "bcp195-ex"]
LogLevel = Literal["debug", "info", "warning", "error"]


class _WorklistSourceRefMarker:
    """Metadata marking a service option whose value names a worklist source."""

    def __repr__(self) -> str:
        return "WorklistSourceRef"


_WORKLIST_SOURCE_REF = _WorklistSourceRefMarker()

# For service plug-ins: an option typed WorklistSourceRef (or list[WorklistSourceRef]) is
# checked against `worklist_sources[].name`.
WorklistSourceRef = Annotated[str, _WORKLIST_SOURCE_REF]


def _error(message: str, key: str | None = None) -> PydanticCustomError:
    """A validation error; ``key`` points it at a key of the model instead of the model."""
    return PydanticCustomError("dicomd", "{message}", {"message": message, "dicomd_key": key})


# --------------------------------------------------------------------------------------------
# The schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunAs(_Model):
    """Who dicomd becomes after binding its ports when started as root outside systemd."""

    user: NonEmptyStr = "dicomd"
    group: NonEmptyStr | None = "dicomd"
    allow_root: bool = False


class Logging(_Model):
    level: LogLevel = "info"
    format: Literal["auto", "journal", "json", "console"] = "auto"
    levels: dict[str, LogLevel] = Field(default_factory=dict)


class Limits(_Model):
    max_associations: Annotated[Int, Field(ge=1)] = 1000
    max_pdu_length: Int = 65536
    acse_timeout: Annotated[Float, Field(gt=0)] = 30.0
    dimse_timeout: Annotated[Float, Field(gt=0)] = 60.0
    idle_timeout: Annotated[Float, Field(ge=0)] = 300.0
    connect_timeout: Annotated[Float, Field(gt=0)] = 10.0
    # Associations one source address may hold at once (None: only max_associations applies).
    max_associations_per_address: Annotated[Int, Field(ge=1)] | None = None

    @field_validator("max_pdu_length")
    @classmethod
    def _pdu_length(cls, value: int) -> int:
        # PS3.8 D.1: the Maximum Length Received is a 32-bit value; 0 means no limit. Below
        # 4 KiB every data set is cut into so many PDVs that the peer is likely misconfigured.
        if value != 0 and not 4096 <= value <= 0xFFFFFFFF:
            raise ValueError(f"must be 0 (unlimited) or between 4096 and 4294967295, got {value}")
        return value


class ListenerTLS(_Model):
    certificate: Path
    private_key: Path
    ca_file: Path | None = None
    ca_directory: Path | None = None
    crl_file: Path | None = None
    peer_certificate: Literal["require", "verify", "ignore"] = "require"
    min_version: TLSVersion = "1.2"
    profile: TLSProfile = "bcp195"

    @model_validator(mode="after")
    def _needs_ca(self) -> ListenerTLS:
        if self.peer_certificate != "ignore" and self.ca_file is None and self.ca_directory is None:
            raise _error(
                f"peer_certificate {_quote(self.peer_certificate)} needs ca_file or "
                "ca_directory to verify client certificates",
                key="peer_certificate",
            )
        return self


class PeerTLS(_Model):
    certificate: Path | None = None
    private_key: Path | None = None
    ca_file: Path | None = None
    ca_directory: Path | None = None
    server_name: NonEmptyStr | None = None
    min_version: TLSVersion = "1.2"
    profile: TLSProfile = "bcp195"

    @model_validator(mode="after")
    def _key_pair(self) -> PeerTLS:
        if self.certificate is not None and self.private_key is None:
            raise _error("certificate needs private_key", key="certificate")
        if self.private_key is not None and self.certificate is None:
            raise _error("private_key needs certificate", key="private_key")
        return self


class Listener(_Model):
    name: Name
    address: Address = "0.0.0.0"
    port: Port
    backlog: Annotated[Int, Field(ge=1)] = 512
    tls: ListenerTLS | None = None


class Services(_Model):
    """Base of the per-registry services model: one optional field per plug-in.

    Absent key: disabled. ``verification:`` with no value (or ``true``): enabled with default
    options. ``false``: disabled. A mapping: the plug-in's options.
    """

    @model_validator(mode="before")
    @classmethod
    def _enable_null(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        keys = {f.alias or n for n, f in cls.model_fields.items()}
        out: dict[Any, Any] = {}
        for key, value in data.items():
            if key in keys and (value is None or value is True):
                out[key] = {}
            elif key in keys and value is False:
                out[key] = None
            else:
                out[key] = value
        return out

    @model_validator(mode="after")
    def _at_least_one(self) -> Services:
        if all(value is None for _, value in self):
            known = ", ".join(sorted(f.alias or n for n, f in type(self).model_fields.items()))
            raise _error(f"at least one service must be enabled (known: {known or 'none'})")
        return self


class LocalAE(_Model):
    ae_title: AETitle
    description: str = ""
    listeners: list[str] | None = None
    max_associations: Annotated[Int, Field(ge=1)] | None = None
    services: Services

    def enabled_services(self) -> dict[str, ServiceOptions]:
        """Service plug-in name → options, for the services this AE serves."""
        fields = type(self.services).model_fields
        return {
            fields[name].alias or name: value for name, value in self.services if value is not None
        }


class Peer(_Model):
    name: NonEmptyStr
    ae_title: AETitle
    host: Address
    port: Port
    tls: PeerTLS | None = None
    services: list[str] = Field(default_factory=list)
    move_destination: bool = False
    allowed_move_destinations: list[str] = Field(default_factory=list)


def _check_layout(layout: str) -> str:
    try:
        parsed = list(string.Formatter().parse(layout))
    except ValueError as exc:
        raise ValueError(f"{_quote(layout)} is not a valid layout: {exc}") from None
    allowed = ", ".join(sorted(LAYOUT_PLACEHOLDERS))
    names: set[str] = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in LAYOUT_PLACEHOLDERS or spec or conversion:
            text = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"unknown placeholder {{{text}}} (allowed: {allowed})")
        names.add(field)
    if "SOPInstanceUID" not in names:
        # Without it two instances of a series would map to the same file.
        raise ValueError("must contain {SOPInstanceUID}")
    if layout.startswith("/"):
        raise ValueError(f"must be a path relative to archive.root, got {_quote(layout)}")
    if ".." in PurePath(layout).parts:
        raise ValueError("must not contain '..'")
    return layout


class Archive(_Model):
    root: Path = Path("/var/lib/dicomd/archive")
    layout: Annotated[str, AfterValidator(_check_layout)] = (
        "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    )
    index_url: str = "sqlite:////var/lib/dicomd/index.sqlite"
    durability: Literal["full", "none"] = "full"

    @field_validator("index_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(
                f"{_quote(value)} is not a database URL "
                "(such as sqlite:////var/lib/dicomd/index.sqlite)"
            )
        return value


class WorklistSource(_Model):
    name: NonEmptyStr
    kind: Literal["folder", "sql"]
    path: Path | None = None

    @model_validator(mode="after")
    def _path_for_kind(self) -> WorklistSource:
        if self.kind == "folder" and self.path is None:
            raise _error("kind 'folder' needs a path", key="path")
        if self.kind == "sql" and self.path is not None:
            raise _error("path is not used with kind 'sql'", key="path")
        return self


class AccessRule(_Model):
    model_config = ConfigDict(populate_by_name=True)

    name: NonEmptyStr
    action: Literal["allow", "deny"] = "allow"
    from_: list[Network] = Field(default_factory=list, alias="from")
    except_from: list[Network] = Field(default_factory=list)
    calling: list[AETitlePattern] = Field(default_factory=list)
    called: list[AETitle] = Field(default_factory=list)
    listeners: list[str] = Field(default_factory=list)
    services: list[str] = Field(default_factory=list)
    tls_subject: list[str] = Field(default_factory=list)
    user_identity: list[str] = Field(default_factory=list)
    move_destinations: list[str] = Field(default_factory=list)


class Access(_Model):
    default: Literal["allow", "deny"] = "deny"
    rules: list[AccessRule] = Field(default_factory=list)


class Config(_Model):
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Worker processes serving the listeners (dicomd.workers); auto: one per CPU.
    workers: Literal["auto"] | Annotated[Int, Field(ge=1, le=64)] = 1
    shutdown_timeout: Annotated[Float, Field(gt=0)] = 30.0
    run_as: RunAs = Field(default_factory=RunAs)
    logging: Logging = Field(default_factory=Logging)
    limits: Limits = Field(default_factory=Limits)
    listeners: Annotated[list[Listener], Field(min_length=1)]
    local_aes: Annotated[list[LocalAE], Field(min_length=1)]
    peers: list[Peer] = Field(default_factory=list)
    archive: Archive = Field(default_factory=Archive)
    worklist_sources: list[WorklistSource] = Field(default_factory=list)
    access: Access = Field(default_factory=Access)


def _services_key(registry: Registry) -> tuple[tuple[str, type[ServiceOptions]], ...]:
    return tuple(sorted((name, cls.Options) for name, cls in registry.services.items()))


@functools.lru_cache(maxsize=32)
def _config_model(services: tuple[tuple[str, type[ServiceOptions]], ...]) -> type[Config]:
    fields: dict[str, Any] = {}
    for index, (name, options) in enumerate(services):
        # A plug-in name need not be a Python identifier ("storage-commitment"): the field
        # gets a safe name and the plug-in name as its alias.
        safe = name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("model_")
        field_name = name if safe else f"service_{index}"
        fields[field_name] = (options | None, Field(default=None, alias=name))
    services_model = create_model("Services", __base__=Services, __module__=__name__, **fields)
    local_ae_model = create_model(
        "LocalAE", __base__=LocalAE, __module__=__name__, services=(services_model, ...)
    )
    return create_model(
        "Config",
        __base__=Config,
        __module__=__name__,
        local_aes=(Annotated[list[local_ae_model], Field(min_length=1)], ...),  # type: ignore[valid-type]
    )


def config_model(registry: Registry) -> type[Config]:
    """The Config subclass that validates ``local_aes[].services`` against ``registry``."""
    return _config_model(_services_key(registry))


# --------------------------------------------------------------------------------------------
# YAML reading with positions


@dataclass(frozen=True, slots=True)
class _Mark:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(slots=True)
class _Node:
    mark: _Mark | None


@dataclass(slots=True)
class _Scalar(_Node):
    value: Any
    plain_text: str | None = None  # source text of an unquoted scalar, for "quote it" hints


@dataclass(slots=True)
class _Seq(_Node):
    items: list[_Node]


@dataclass(slots=True)
class _Map(_Node):
    items: dict[str, tuple[_Mark | None, _Node]]  # key → (mark of the key, value)


def _kind(node: _Node) -> str:
    if isinstance(node, _Map):
        return "mapping"
    if isinstance(node, _Seq):
        return "list"
    return "scalar"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the module docstring for why)."""


_TAG = "tag:yaml.org,2002:"
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag[len(_TAG) :] not in {"bool", "int", "float", "timestamp"}
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _TAG + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    _TAG + "int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _TAG + "float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    value = str(loader.construct_scalar(node)).lower()
    if value in ("true", "false"):
        return value == "true"
    raise yaml.constructor.ConstructorError(
        None, None, f"invalid boolean {value!r}", node.start_mark
    )


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"invalid integer {text!r}", node.start_mark
        ) from None


_Loader.add_constructor(_TAG + "bool", _construct_bool)
_Loader.add_constructor(_TAG + "int", _construct_int)


def _yaml_mark(file: str, mark: Any) -> _Mark:
    return _Mark(file, mark.line + 1, mark.column + 1)


def _format_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    out = ""
    for element in path:
        if isinstance(element, int):
            out += f"[{element}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", element):
            out += ("." if out else "") + element
        else:
            out += f"[{_quote(element)}]"
    return out


class _Collector:
    """Accumulates findings (errors and warnings) from every stage of loading."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(
        self,
        mark: _Mark | None,
        path: tuple[str | int, ...] | list[str | int],
        message: str,
        severity: Literal["error", "warning"] = "error",
        file: str | None = None,
    ) -> None:
        self.findings.append(
            Finding(
                file=mark.file if mark else file,
                line=mark.line if mark else None,
                column=mark.column if mark else None,
                key_path=_format_path(path),
                message=message,
                severity=severity,
            )
        )

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)


class _Reader:
    """Turns one YAML text into a _Node tree that remembers where every key and value is."""

    def __init__(self, file: str, out: _Collector) -> None:
        self.file = file
        self.out = out
        self.ok = True

    def _fail(self, mark: _Mark | None, path: tuple[str | int, ...], message: str) -> None:
        self.ok = False
        self.out.add(mark, path, message, file=self.file)

    def read(self, text: str) -> _Map | None:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:  # an empty file (or only comments) adds nothing
                return _Map(_Mark(self.file, 1, 1), {})
            node = self._convert(loader, root, (), set())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "invalid YAML"
            self._fail(
                _yaml_mark(self.file, mark) if mark else None, (), f"YAML syntax error: {problem}"
            )
            return None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else exc.character
            self._fail(
                _Mark(self.file, line, column),
                (),
                f"YAML syntax error: unacceptable character {what}: {exc.reason}",
            )
            return None
        finally:
            loader.dispose()
        if not self.ok:
            return None
        if not isinstance(node, _Map):
            self._fail(node.mark, (), f"the top level must be a mapping, got a {_kind(node)}")
            return None
        return node

    def _convert(
        self, loader: _Loader, node: yaml.Node, path: tuple[str | int, ...], active: set[int]
    ) -> _Node:
        mark = _yaml_mark(self.file, node.start_mark)
        if id(node) in active:
            self._fail(mark, path, "recursive alias")
            return _Scalar(mark, None)
        if isinstance(node, yaml.ScalarNode):
            try:
                value = loader.construct_object(node)
            except (yaml.YAMLError, ValueError) as exc:
                problem = getattr(exc, "problem", None) or str(exc)
                self._fail(mark, path, f"YAML syntax error: {problem}")
                value = None
            return _Scalar(mark, value, node.value if node.style is None else None)
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return _Seq(
                mark,
                [
                    self._convert(loader, child, (*path, i), active)
                    for i, child in enumerate(node.value)
                ],
            )
        assert isinstance(node, yaml.MappingNode)
        items: dict[str, tuple[_Mark | None, _Node]] = {}
        inherited: dict[str, tuple[_Mark | None, _Node]] = {}
        for key_node, value_node in node.value:
            key_mark = _yaml_mark(self.file, key_node.start_mark)
            if key_node.tag == _TAG + "merge":
                # `<<: *anchor` (or a list of anchors): keys not set explicitly come from there.
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in sources:
                    merged = self._convert(loader, source, path, active)
                    if not isinstance(merged, _Map):
                        self._fail(key_mark, path, "'<<' needs a mapping or a list of mappings")
                        continue
                    for key, entry in merged.items.items():
                        inherited.setdefault(key, entry)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._fail(key_mark, path, "keys must be plain strings")
                continue
            # The key's source text: a key `no:` or `1:` means the string the admin typed.
            key = key_node.value
            if key in items:
                # Not fatal: keep the first value so that the rest can still be checked.
                self.out.add(
                    key_mark,
                    path,
                    f"duplicate key {_quote(key)} (first defined at {items[key][0]})",
                )
                continue
            items[key] = (key_mark, self._convert(loader, value_node, (*path, key), active))
        for key, entry in inherited.items():
            items.setdefault(key, entry)
        return _Map(mark, items)


def _merge(base: _Node, over: _Node, path: tuple[str, ...], out: _Collector) -> _Node:
    """``over`` (a later file) merged into ``base``; see the module docstring for the rules."""
    if isinstance(base, _Map) and isinstance(over, _Map):
        items = dict(base.items)
        for key, (key_mark, value) in over.items.items():
            if key in items:
                old_mark, old = items[key]
                merged = _merge(old, value, (*path, key), out)
                items[key] = (key_mark if merged is value else old_mark, merged)
            else:
                items[key] = (key_mark, value)
        return _Map(base.mark, items)
    if path in NAMED_LISTS:
        if isinstance(base, _Seq) and isinstance(over, _Seq):
            return _Seq(base.mark, base.items + over.items)
    elif not (isinstance(base, _Map) or isinstance(over, _Map)):
        return over
    out.add(over.mark, path, f"cannot merge a {_kind(over)} with the {_kind(base)} at {base.mark}")
    return base


def _plain(node: _Node) -> Any:
    if isinstance(node, _Map):
        return {key: _plain(value) for key, (_, value) in node.items.items()}
    if isinstance(node, _Seq):
        return [_plain(item) for item in node.items]
    assert isinstance(node, _Scalar)
    return node.value


def _tree(value: Any) -> _Node:
    """A position-less tree for data that did not come from a file (parse_config)."""
    if isinstance(value, Mapping):
        return _Map(None, {str(k): (None, _tree(v)) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return _Seq(None, [_tree(v) for v in value])
    return _Scalar(None, value)


@dataclass(slots=True)
class _Located:
    path: list[str | int]  # the part of the location that exists in the tree
    node: _Node | None  # the deepest node reached
    key_mark: _Mark | None  # the mark of the last key walked through
    complete: bool


def _locate(root: _Node, loc: tuple[Any, ...]) -> _Located:
    node: _Node = root
    path: list[str | int] = []
    key_mark: _Mark | None = None
    for element in loc:
        if isinstance(node, _Map) and isinstance(element, str) and element in node.items:
            key_mark, node = node.items[element]
        elif isinstance(node, _Seq) and isinstance(element, int) and 0 <= element < len(node.items):
            node = node.items[element]
        else:
            return _Located(path, node, key_mark, False)
        path.append(element)
    return _Located(path, node, key_mark, True)


# --------------------------------------------------------------------------------------------
# pydantic errors → findings


def _strip(annotation: Any) -> Any:
    """``annotation`` without Annotated[...] and without ``| None``."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at ``loc``, if it is a model."""
    annotation: Any = model
    for element in loc:
        annotation = _strip(annotation)
        origin = get_origin(annotation)
        if isinstance(element, int) and origin in (list, tuple, set, frozenset):
            annotation = get_args(annotation)[0]
        elif isinstance(element, str) and origin is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {f.alias or n: f for n, f in annotation.model_fields.items()}
            if element not in fields:
                return None
            annotation = fields[element].annotation
        else:
            return None
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _expected(values: str) -> str:
    # pydantic writes "'auto', 'uvloop' or 'asyncio'".
    return ", ".join(re.findall(r"'([^']*)'", values)) or values


def _pydantic_message(
    err: Mapping[str, Any], root_model: type[BaseModel], node: _Node | None
) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    got = _describe(value)
    loc = tuple(err["loc"])
    if kind == "missing":
        return f"missing required key {_quote(str(loc[-1]))}"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = _model_at(root_model, loc[:-1])
        if parent is not None and issubclass(parent, Services):
            known = ", ".join(sorted(f.alias or n for n, f in parent.model_fields.items()))
            return f"unknown service {_quote(key)} (known: {known or 'none'})"
        if parent is not None:
            keys = sorted(f.alias or n for n, f in parent.model_fields.items())
            if keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {_quote(close[0])}? " if close else ""
                return f"unknown key {_quote(key)} ({hint}expected one of: {', '.join(keys)})"
            return f"unknown key {_quote(key)} (no keys are allowed here)"
        return f"unknown key {_quote(key)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {got}"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"expected a number, got {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got}"
    if kind == "string_type":
        hint = ""
        if isinstance(node, _Scalar) and node.plain_text and value is not None:
            # YAML read `104` or `true` as a number or boolean; quoting keeps it a string.
            hint = f' (quote it: "{node.plain_text}")'
        return f"expected a string, got {got}{hint}"
    if kind in ("list_type", "tuple_type", "set_type"):
        return f"expected a list, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "dataclass_type"):
        return f"expected a mapping, got {got}"
    if kind == "path_type":
        return f"expected a path, got {got}"
    if kind == "literal_error":
        return f"must be one of: {_expected(str(ctx.get('expected', '')))} (got {got})"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}, got {got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}, got {got}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}, got {got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}, got {got}"
    if kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must have at least {n} items"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if kind == "dicomd":
        return str(ctx["message"])
    return str(err["msg"])


def _pydantic_findings(
    exc: ValidationError, root: _Node, model: type[BaseModel], out: _Collector
) -> None:
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = (err.get("ctx") or {}).get("dicomd_key")
        if key:
            loc = (*loc, key)
        found = _locate(root, loc)
        kind = err["type"]
        message = _pydantic_message(err, model, found.node)
        if kind == "extra_forbidden" and found.complete:
            # Point at the unknown key itself; the path names the mapping it is in.
            out.add(found.key_mark, found.path[:-1], message)
        else:
            # A missing key (or a model-level error about an absent key) points at the
            # mapping that should contain it.
            out.add(found.node.mark if found.node else None, found.path, message)


# --------------------------------------------------------------------------------------------
# Checks across the whole configuration


@dataclass(frozen=True, slots=True)
class _Problem:
    loc: tuple[str | int, ...]
    message: str
    other: tuple[str | int, ...] | None = None  # the earlier place, for duplicates and clashes
    other_word: str = "first defined at"


def _maps(value: Any) -> list[tuple[int, dict[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)]


def _strings(value: Any) -> list[tuple[int, str]]:
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, str)]


def _known(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


def _truthy(value: Any) -> bool:
    # What pydantic's lax bool accepts as true.
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "on", "1", "t", "y"}
    return value is True or (isinstance(value, int) and value == 1)


def _ip(text: str) -> IPv4Address | IPv6Address | str:
    literal = text.strip()
    if literal.startswith("[") and literal.endswith("]"):
        literal = literal[1:-1]
    try:
        return ip_address(literal)
    except ValueError:
        return literal.lower()


def _overlap(a: IPv4Address | IPv6Address | str, b: IPv4Address | IPv6Address | str) -> bool:
    if a == b:
        return True
    if isinstance(a, str) or isinstance(b, str) or a.version != b.version:
        # asyncio sets IPV6_V6ONLY, so :: and 0.0.0.0 on one port do not clash.
        return False
    return a.is_unspecified or b.is_unspecified


def _unique(
    problems: list[_Problem],
    prefix: tuple[str, ...],
    items: list[tuple[int, dict[str, Any]]],
    key: str,
    what: str,
    normalize: Any = None,
) -> dict[str, tuple[str | int, ...]]:
    """Report duplicates of ``item[key]``; return each identity and where it is defined."""
    seen: dict[str, tuple[str | int, ...]] = {}
    for i, item in items:
        value = item.get(key)
        if not isinstance(value, str):
            continue
        identity = normalize(value) if normalize else value
        if identity == "":
            continue
        loc = (*prefix, i, key)
        if identity in seen:
            problems.append(_Problem(loc, f"duplicate {what} {_quote(identity)}", seen[identity]))
        else:
            seen[identity] = loc
    return seen


def _has_worklist_ref(annotation: Any, metadata: list[Any]) -> bool:
    if any(m is _WORKLIST_SOURCE_REF for m in metadata):
        return True
    if get_origin(annotation) is Annotated:
        args = get_args(annotation)
        if any(m is _WORKLIST_SOURCE_REF for m in args[1:]):
            return True
    return any(_has_worklist_ref(arg, []) for arg in get_args(annotation))


def _semantic_problems(data: Any, registry: Registry) -> list[_Problem]:
    """Checks that span sections; they read the raw data defensively so that they run (and
    report) even when some values failed validation."""
    problems: list[_Problem] = []
    if not isinstance(data, dict):
        return problems
    permissions = BASE_PERMISSIONS | registry.permissions()

    def ae(value: str) -> str:
        return value.strip(" ")

    # Identities of named-list items: unique within and across files (they were concatenated).
    identities: dict[tuple[str, ...], dict[str, tuple[str | int, ...]]] = {}
    for path, (key, what) in NAMED_LISTS.items():
        container: Any = data
        for part in path[:-1]:
            container = container.get(part) if isinstance(container, dict) else None
        items = _maps(container.get(path[-1])) if isinstance(container, dict) else []
        normalize = ae if key == "ae_title" else None
        identities[path] = _unique(problems, path, items, key, what, normalize)

    listeners = _maps(data.get("listeners"))
    listener_names = identities[("listeners",)]
    bound: list[tuple[Any, int, str, str, tuple[str | int, ...]]] = []
    for i, item in listeners:
        port = item.get("port")
        address = item.get("address", "0.0.0.0")
        if not isinstance(port, int) or isinstance(port, bool) or not isinstance(address, str):
            continue
        ip = _ip(address)
        for other_ip, other_port, other_name, other_address, other_loc in bound:
            if other_port == port and _overlap(ip, other_ip):
                problems.append(
                    _Problem(
                        ("listeners", i, "port"),
                        f"port {port} on {address} is already used by listener "
                        f"{_quote(other_name)} on {other_address}",
                        other_loc,
                        "defined at",
                    )
                )
                break
        else:
            bound.append((ip, port, str(item.get("name")), address, ("listeners", i, "port")))

    local_aes = _maps(data.get("local_aes"))
    ae_titles = identities[("local_aes",)]
    check_listeners = isinstance(data.get("listeners"), list)
    for i, item in local_aes:
        if check_listeners:
            for j, name in _strings(item.get("listeners")):
                if name not in listener_names:
                    problems.append(
                        _Problem(
                            ("local_aes", i, "listeners", j),
                            f"unknown listener {_quote(name)} (known: {_known(listener_names)})",
                        )
                    )

    peers = _maps(data.get("peers"))
    peers_by_name = {p["name"]: p for _, p in peers if isinstance(p.get("name"), str)}
    for i, item in peers:
        for j, verb in _strings(item.get("services")):
            if verb not in permissions:
                problems.append(
                    _Problem(
                        ("peers", i, "services", j),
                        f"unknown service {_quote(verb)} (known: {_known(permissions)})",
                    )
                )
        for j, name in _strings(item.get("allowed_move_destinations")):
            loc = ("peers", i, "allowed_move_destinations", j)
            if name not in peers_by_name:
                problems.append(
                    _Problem(loc, f"unknown peer {_quote(name)} (known: {_known(peers_by_name)})")
                )
            elif not _truthy(peers_by_name[name].get("move_destination")):
                problems.append(
                    _Problem(
                        loc,
                        f"peer {_quote(name)} is not a move destination "
                        "(set move_destination: true on it)",
                    )
                )

    source_names = identities[("worklist_sources",)]

    access = data.get("access")
    rules = _maps(access.get("rules")) if isinstance(access, dict) else []
    for i, rule in rules:
        if check_listeners:
            for j, name in _strings(rule.get("listeners")):
                if name not in listener_names:
                    problems.append(
                        _Problem(
                            ("access", "rules", i, "listeners", j),
                            f"unknown listener {_quote(name)} (known: {_known(listener_names)})",
                        )
                    )
        for j, title in _strings(rule.get("called")):
            if ae(title) and ae(title) not in ae_titles:
                problems.append(
                    _Problem(
                        ("access", "rules", i, "called", j),
                        f"unknown local AE title {_quote(ae(title))} (known: {_known(ae_titles)})",
                    )
                )
        for j, verb in _strings(rule.get("services")):
            if verb not in permissions:
                problems.append(
                    _Problem(
                        ("access", "rules", i, "services", j),
                        f"unknown service {_quote(verb)} (known: {_known(permissions)})",
                    )
                )
        for j, name in _strings(rule.get("move_destinations")):
            loc = ("access", "rules", i, "move_destinations", j)
            if name not in peers_by_name:
                problems.append(
                    _Problem(loc, f"unknown peer {_quote(name)} (known: {_known(peers_by_name)})")
                )
            elif not _truthy(peers_by_name[name].get("move_destination")):
                problems.append(
                    _Problem(
                        loc,
                        f"peer {_quote(name)} is not a move destination "
                        "(set move_destination: true on it)",
                    )
                )

    # Service options typed WorklistSourceRef must name a configured worklist source.
    for i, item in local_aes:
        services = item.get("services")
        if not isinstance(services, dict):
            continue
        for service_name, options in services.items():
            plugin = registry.services.get(service_name)
            if plugin is None or not isinstance(options, dict):
                continue
            for field_name, field in plugin.Options.model_fields.items():
                if not _has_worklist_ref(field.annotation, list(field.metadata)):
                    continue
                key = field.alias or field_name
                value = options.get(key)
                base = ("local_aes", i, "services", service_name, key)
                refs = (
                    [(base, value)]
                    if isinstance(value, str)
                    else [((*base, j), v) for j, v in _strings(value)]
                )
                for loc, name in refs:
                    if name not in source_names:
                        problems.append(
                            _Problem(
                                loc,
                                f"unknown worklist source {_quote(name)} "
                                f"(known: {_known(source_names)})",
                            )
                        )
    return problems


def _relative_paths(
    value: Any, loc: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], PurePath]]:
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from _relative_paths(getattr(value, name), (*loc, field.alias or name))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _relative_paths(item, (*loc, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _relative_paths(item, (*loc, str(key)))
    elif isinstance(value, PurePath) and not value.is_absolute():
        yield loc, value


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    files: tuple[Path, ...]  # the files read, in merge order; empty for the defaults
    is_default: bool  # True when no file existed and the development defaults are in use
    warnings: tuple[Finding, ...]


def _sorted(findings: list[Finding], files: list[str]) -> list[Finding]:
    rank = {name: i for i, name in enumerate(files)}
    return sorted(
        findings,
        key=lambda f: (
            rank.get(f.file, len(rank)) if f.file is not None else len(rank) + 1,
            f.line or 0,
            f.column or 0,
        ),
    )


def _validate(root: _Node, registry: Registry, out: _Collector) -> Config | None:
    """Validate a merged tree; errors and warnings go to ``out``."""
    model = config_model(registry)
    data = _plain(root)
    config: Config | None = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        _pydantic_findings(exc, root, model, out)
    for problem in _semantic_problems(data, registry):
        found = _locate(root, problem.loc)
        message = problem.message
        if problem.other is not None:
            other = _locate(root, problem.other)
            mark = other.node.mark if other.node is not None and other.complete else None
            message += f" ({problem.other_word} {mark or _format_path(problem.other)})"
        out.add(found.node.mark if found.node else None, found.path, message)
    if config is None or out.has_errors:
        return None
    for loc, path in _relative_paths(config, ()):
        found = _locate(root, loc)
        if found.complete:  # defaults are absolute; only paths someone wrote are worth a word
            out.add(
                found.node.mark if found.node else None,
                found.path,
                f"relative path {_quote(str(path))} depends on the working directory "
                "(/ when started by systemd); use an absolute path",
                severity="warning",
            )
    return config


def _registry(registry: Registry | None, out: _Collector) -> Registry:
    if registry is not None:
        return registry
    found, problems = discover()
    for problem in problems:
        out.add(None, (), problem, severity="warning")
    return found


def parse_config(data: Mapping[str, Any], *, registry: Registry | None = None) -> Config:
    """Validate configuration data that did not come from a file (tests, tools).

    Raises ConfigError; findings carry key paths but no file positions.
    """
    out = _Collector()
    registry = _registry(registry, out)
    config = _validate(_tree(data), registry, out)
    if config is None:
        raise ConfigError(out.findings)
    return config


def development_defaults(
    base_dir: Path | None = None, *, registry: Registry | None = None
) -> Config:
    """A configuration for running from a source tree: everything under ``base_dir``
    (default ``./var``), every installed service on AE ``DICOMD`` at port 11112, access open.
    """
    base = (base_dir if base_dir is not None else Path.cwd() / "var").absolute()
    out = _Collector()
    registry = _registry(registry, out)
    services: dict[str, Any] = {}
    for name, plugin in sorted(registry.services.items()):
        try:
            plugin.Options()
        except ValidationError:
            continue  # a plug-in with required options cannot be enabled blindly
        services[name] = None
    data = {
        "listeners": [{"name": "dicom", "address": "0.0.0.0", "port": 11112}],
        "local_aes": [{"ae_title": "DICOMD", "services": services}],
        "archive": {
            "root": str(base / "archive"),
            "index_url": f"sqlite:///{base / 'index.sqlite'}",
        },
        "worklist_sources": [
            {"name": "default", "kind": "folder", "path": str(base / "worklists")}
        ],
        "access": {"default": "allow"},
        "run_as": {"allow_root": False},
    }
    return parse_config(data, registry=registry)


def _read_file(path: Path, out: _Collector) -> _Map | None:
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        out.add(None, (), f"cannot read: {exc.strerror or exc}", file=file)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        out.add(
            None,
            (),
            f"cannot read: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            file=file,
        )
        return None
    return _Reader(file, out).read(text)


def _conf_d_files(main: Path, out: _Collector) -> list[Path]:
    directory = main.parent / CONF_D_NAME
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        out.add(None, (), f"cannot read: {exc.strerror or exc}", file=str(directory))
        return []
    files: list[Path] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".yaml"):
            files.append(entry)
        elif entry.name.endswith(".yml"):
            out.add(None, (), "ignored: only files ending in .yaml are read", "warning", str(entry))
    return files


def load_config(path: Path | None = None, *, registry: Registry | None = None) -> LoadedConfig:
    """Read, merge and validate the configuration; raise ConfigError with every finding.

    ``path`` None: DEFAULT_CONFIG_PATH and its conf.d if it exists, else the development
    defaults (``is_default=True``). A given ``path`` must exist.
    """
    out = _Collector()
    registry = _registry(registry, out)
    if path is None:
        path = DEFAULT_CONFIG_PATH
        try:
            path.stat()
        except FileNotFoundError:
            return LoadedConfig(
                config=development_defaults(registry=registry),
                files=(),
                is_default=True,
                warnings=tuple(out.findings),
            )
        except OSError:
            pass  # exists but cannot be inspected: reading it reports the real problem
    path = Path(path)
    files = [path, *_conf_d_files(path, out)]
    names = [str(f) for f in files]
    trees = [_read_file(f, out) for f in files]
    if any(t is None for t in trees):
        # Validating what is left of a broken set of files would only add noise.
        raise ConfigError(_sorted(out.findings, names))
    root: _Node = trees[0]  # type: ignore[assignment]
    for tree in trees[1:]:
        assert tree is not None
        root = _merge(root, tree, (), out)
    config = _validate(root, registry, out)
    findings = _sorted(out.findings, names)
    if config is None:
        raise ConfigError(findings)
    return LoadedConfig(
        config=config, files=tuple(files), is_default=False, warnings=tuple(findings)
    )


def check_config(path: Path | None) -> tuple[list[Finding], LoadedConfig | None]:
    """For ``dicomd check-config``: every finding (errors and warnings), and the
    configuration when it is usable."""
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        return list(exc.findings), None
    return list(loaded.warnings), loaded
