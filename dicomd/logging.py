"""Logging for dicomd: structlog with per-logger levels and three sinks.

Sinks (``fmt``):

- ``journal``: native journald entries (see dicomd.system.journald). ``MESSAGE`` is the
  event text followed by ``key=value`` for every bound field that is not a DICOM field;
  ``PRIORITY`` is the syslog level; ``SYSLOG_IDENTIFIER=dicomd``; ``LOGGER`` is the
  logger name. Bound fields named ``dicom_*`` become ``DICOM_*`` journal fields (so
  ``journalctl DICOM_CALLING_AE=MODALITY1`` works); every other bound field is also kept
  as a ``DICOMD_<NAME>`` field — the prefix keeps arbitrary keys from colliding with
  journald's well-known fields (``MESSAGE``, ``PRIORITY``, ``CODE_FILE``...). Tracebacks
  are appended to MESSAGE. If journald cannot be reached the line goes to the stream
  instead, prefixed with ``<N>`` so journald's stdout capture still knows its priority.
- ``json``: one JSON object per line: ``timestamp`` (ISO 8601, UTC), ``level``,
  ``logger``, ``event``, then the bound fields.
- ``console``: structlog's ConsoleRenderer, for a human at a terminal.
- ``auto``: journal when stderr is systemd's journal stream (``$JOURNAL_STREAM``), console
  on a tty, JSON lines otherwise.

Levels: ``level`` is the default; ``levels`` overrides it per logger name prefix
(``{"dicomd.net": "debug"}`` also covers ``dicomd.net.pdu``; the longest prefix wins).
Use :func:`get_logger` for dicomd code: a disabled level costs one attribute check and a
comparison (no event dict is built), which matters because the network hot path logs at
debug. Loggers obtained from structlog directly are filtered too, by a processor that
reads their ``logger`` field. Standard-library logging (pynetdicom, pydicom) is routed
into the same pipeline under its own logger names.

Before :func:`configure_logging` is first called, nothing is filtered and structlog's own
defaults apply, so tests using ``structlog.testing.capture_logs()`` see every event.
"""

from __future__ import annotations

import json
import logging as _stdlib_logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from dicomd.system.journald import JournalSender, journal_stream_matches, sanitize_field_name

__all__ = [
    "LEVELS",
    "PRIORITIES",
    "Logger",
    "configure_logging",
    "effective_level",
    "filter_by_logger_level",
    "get_logger",
    "reset_logging",
]

LEVELS: Mapping[str, int] = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
    "critical": 50,
}
# syslog(3) priorities, which journald's PRIORITY field and the "<N>" prefix use.
PRIORITIES: Mapping[str, int] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}
_ALIASES = {"warn": "warning", "fatal": "critical", "exception": "error", "msg": "info"}
# Level of each structlog method name, as the filtering processor sees them.
_METHOD_LEVEL = {**LEVELS, **{alias: LEVELS[name] for alias, name in _ALIASES.items()}}

_DEBUG, _INFO, _WARNING, _ERROR, _CRITICAL = 10, 20, 30, 40, 50

FORMATS = ("auto", "journal", "json", "console")


class _State:
    """Current level configuration; ``generation`` tells loggers to re-read it."""

    generation = 0
    default_level = 0  # unconfigured: let everything through, like structlog's default
    overrides: dict[str, int] = {}
    cache: dict[str, int] = {}


def _parse_level(value: str | int, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in LEVELS.values():
        return value
    name = str(value).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in LEVELS:
        raise ValueError(
            f"unknown log level {value!r} for {what}; expected one of {', '.join(LEVELS)}"
        )
    return LEVELS[name]


def effective_level(name: str | None) -> int:
    """The numeric level for logger *name*: the longest matching prefix in ``levels``."""
    key = name or ""
    level = _State.cache.get(key)
    if level is not None:
        return level
    level, best = _State.default_level, -1
    for prefix, prefix_level in _State.overrides.items():
        if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
            level, best = prefix_level, len(prefix)
    _State.cache[key] = level
    return level


def filter_by_logger_level(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """structlog processor: drop events below the level configured for their ``logger``."""
    level = _METHOD_LEVEL.get(method_name, _INFO)
    if level < effective_level(event_dict.get("logger")):
        raise structlog.DropEvent
    return event_dict


# structlog's lazy proxy: resolved against the current configuration at each emitted event,
# so capture_logs() and reconfiguration reach loggers created earlier. (The context is passed
# per call: structlog.get_logger(logger=...) would clash with wrap_logger's own parameter.)
_TARGET = structlog.get_logger()


class Logger:
    """A named logger; what :func:`get_logger` returns.

    Filtering happens here, before structlog builds anything, and follows later
    :func:`configure_logging` calls (SIGHUP) without re-creating module-level loggers.
    Only the synchronous methods exist: structlog's ``a*`` variants use a thread pool.
    """

    __slots__ = ("_context", "_generation", "_level", "name")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self._context: dict[str, Any] = {"logger": name, **(context or {})}
        self._generation = -1
        self._level = 0

    def _threshold(self) -> int:
        if self._generation != _State.generation:
            self._level = effective_level(self.name)
            self._generation = _State.generation
        return self._level

    def is_enabled_for(self, level: str | int) -> bool:
        """Whether *level* would be emitted: guard for costly arguments (PDU hex dumps)."""
        number = LEVELS.get(level) if type(level) is str else None  # the usual spelling
        if number is None:
            number = _parse_level(level, self.name)
        return number >= self._threshold()

    def bind(self, **values: Any) -> Logger:
        return Logger(self.name, {**self._context, **values})

    def unbind(self, *keys: str) -> Logger:
        context = dict(self._context)
        for key in keys:
            del context[key]
        return Logger(self.name, context)

    def try_unbind(self, *keys: str) -> Logger:
        context = dict(self._context)
        for key in keys:
            context.pop(key, None)
        return Logger(self.name, context)

    @property
    def context(self) -> Mapping[str, Any]:
        return dict(self._context)

    def debug(self, event: str, *args: Any, **kw: Any) -> Any:
        if self._threshold() > _DEBUG:
            return None
        return _TARGET.debug(event, *args, **{**self._context, **kw})

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        if self._threshold() > _INFO:
            return None
        return _TARGET.info(event, *args, **{**self._context, **kw})

    def warning(self, event: str, *args: Any, **kw: Any) -> Any:
        if self._threshold() > _WARNING:
            return None
        return _TARGET.warning(event, *args, **{**self._context, **kw})

    warn = warning

    def error(self, event: str, *args: Any, **kw: Any) -> Any:
        if self._threshold() > _ERROR:
            return None
        return _TARGET.error(event, *args, **{**self._context, **kw})

    def exception(self, event: str, *args: Any, **kw: Any) -> Any:
        """error() with the current exception's traceback."""
        if self._threshold() > _ERROR:
            return None
        kw.setdefault("exc_info", True)
        return _TARGET.error(event, *args, **{**self._context, **kw})

    def critical(self, event: str, *args: Any, **kw: Any) -> Any:
        if self._threshold() > _CRITICAL:
            return None
        return _TARGET.critical(event, *args, **{**self._context, **kw})

    fatal = critical

    def log(self, level: str | int, event: str, *args: Any, **kw: Any) -> Any:
        """Log at a level given by name or number (any stdlib number, e.g. a custom 25)."""
        number = level if isinstance(level, int) else _parse_level(level, self.name)
        if number < self._threshold():
            return None
        # The highest named level not above the number: 25 logs as info, 5 as debug.
        name = max(
            (n for n, v in LEVELS.items() if v <= number), key=LEVELS.__getitem__, default="debug"
        )
        return getattr(_TARGET, name)(event, *args, **{**self._context, **kw})

    def __repr__(self) -> str:
        return f"<dicomd.logging.Logger {self.name!r} {self._context!r}>"


def get_logger(name: str, **initial_values: Any) -> Logger:
    """A logger that binds ``logger=name`` (and *initial_values*); cheap to hold at module level."""
    return Logger(name, initial_values)


# --------------------------------------------------------------------------- sinks


class _StreamLogger:
    """Writes rendered lines to a text stream; never raises (stderr may be gone)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must not turn a log call into a failed C-STORE.
            pass

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


def _logfmt_value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False, default=str)
    return text


class _JournalLogger:
    """Receives a list of (FIELD, value) pairs and sends it as one journal entry."""

    def __init__(self, sender: JournalSender, fallback: _StreamLogger) -> None:
        self._sender = sender
        self._fallback = fallback

    def msg(self, fields: list[tuple[str, object]]) -> None:
        if self._sender.send(fields):
            return
        values = dict(fields)
        prefix = f"<{values.get('PRIORITY', PRIORITIES['info'])}>"
        message = str(values.get("MESSAGE", ""))
        # journald's stream reader takes "<N>" per line, so prefix every line.
        self._fallback.msg("\n".join(prefix + line for line in message.split("\n")))

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


class JournalRenderer:
    """Final processor for the journal sink: an event dict → journal field pairs."""

    def __init__(self, identifier: str = "dicomd") -> None:
        self.identifier = identifier

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> tuple[tuple[list[tuple[str, object]]], dict[str, Any]]:
        level = str(event_dict.pop("level", _ALIASES.get(method_name, method_name)))
        event = str(event_dict.pop("event", ""))
        name = event_dict.pop("logger", None)
        exception = event_dict.pop("exception", None)
        stack = event_dict.pop("stack", None)
        event_dict.pop("timestamp", None)  # journald stamps entries itself

        fields: list[tuple[str, object]] = []
        shown: list[str] = []
        for key, value in event_dict.items():
            if key.startswith("dicom_"):
                fields.append((sanitize_field_name("DICOM_" + key[6:]), value))
            else:
                shown.append(f"{key}={_logfmt_value(value)}")
                fields.append((sanitize_field_name("DICOMD_" + key), value))
        message = " ".join([event, *shown]) if shown else event
        for extra in (stack, exception):
            if extra:
                message += "\n" + str(extra)

        head: list[tuple[str, object]] = [
            ("MESSAGE", message),
            ("PRIORITY", PRIORITIES.get(level, PRIORITIES["info"])),
            ("SYSLOG_IDENTIFIER", self.identifier),
        ]
        if name:
            head.append(("LOGGER", name))
        return ((head + fields,), {})


def _order_keys(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, logger, event first in JSON lines, for people reading them raw."""
    ordered = {
        key: event_dict.pop(key)
        for key in ("timestamp", "level", "logger", "event")
        if key in event_dict
    }
    ordered.update(event_dict)
    return ordered


class _StdlibBridge(_stdlib_logging.Handler):
    """Forwards standard-library records (pynetdicom, pydicom, asyncio) into structlog."""

    def emit(self, record: _stdlib_logging.LogRecord) -> None:
        try:
            level = record.levelno
            if level < effective_level(record.name):
                return
            kw: dict[str, Any] = {}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            get_logger(record.name).log(level, record.getMessage(), **kw)
        except Exception:
            self.handleError(record)


def _install_stdlib_bridge(min_level: int) -> None:
    root = _stdlib_logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(min_level, _DEBUG))


_DEFAULT_JOURNAL: list[JournalSender] = []


def _default_journal() -> JournalSender:
    """One sender (one socket) for the process, however often SIGHUP reconfigures."""
    if not _DEFAULT_JOURNAL:
        _DEFAULT_JOURNAL.append(JournalSender())
    return _DEFAULT_JOURNAL[0]


def _choose_format(fmt: str, stream: TextIO) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd >= 0 and journal_stream_matches(fd=fd):
        return "journal"
    try:
        if stream.isatty():
            return "console"
    except (AttributeError, ValueError):
        pass
    return "json"


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    levels: Mapping[str, str] | None = None,
    *,
    stream: TextIO | None = None,
    journal: JournalSender | None = None,
    identifier: str = "dicomd",
) -> str:
    """Configure structlog for the process; safe to call again (SIGHUP reload).

    *stream* defaults to the current ``sys.stderr``; *journal* to the system journal
    socket. Raises ValueError (naming the bad value) for an unknown level or format.
    Returns the format actually chosen ("journal", "json" or "console").
    """
    out = sys.stderr if stream is None else stream
    default_level = _parse_level(level, "the default level")
    overrides = {
        prefix: _parse_level(value, f"logger {prefix!r}")
        for prefix, value in (levels or {}).items()
    }
    chosen = _choose_format(fmt, out)

    shared: list[Processor] = [
        filter_by_logger_level,
        # Per-association context bound with structlog.contextvars follows each task.
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    stream_logger = _StreamLogger(out)
    processors: list[Processor]
    factory: Any
    if chosen == "journal":
        journal_logger = _JournalLogger(journal or _default_journal(), stream_logger)
        processors = [
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            JournalRenderer(identifier),
        ]

        def factory(*_args: Any) -> Any:
            return journal_logger

    elif chosen == "json":
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _order_keys,
            structlog.processors.JSONRenderer(default=str, ensure_ascii=False),
        ]

        def factory(*_args: Any) -> Any:
            return stream_logger

    else:
        try:
            colors = out.isatty()
        except (AttributeError, ValueError):
            colors = False
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.dev.ConsoleRenderer(colors=colors),
        ]

        def factory(*_args: Any) -> Any:
            return stream_logger

    # Update the level state before structlog so no event slips through half-configured.
    _State.default_level = default_level
    _State.overrides = overrides
    _State.cache = {}
    _State.generation += 1
    min_level = min([default_level, *overrides.values()])
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        logger_factory=factory,
        # Not cached: reconfiguration (SIGHUP) and capture_logs() must reach old loggers.
        cache_logger_on_first_use=False,
    )
    _install_stdlib_bridge(min_level)
    return chosen


def reset_logging() -> None:
    """Back to the unconfigured state (nothing filtered, structlog defaults); for tests."""
    _State.default_level = 0
    _State.overrides = {}
    _State.cache = {}
    _State.generation += 1
    structlog.reset_defaults()
    root = _stdlib_logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.setLevel(_stdlib_logging.WARNING)
