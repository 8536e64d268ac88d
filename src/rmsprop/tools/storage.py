"""Where a tuning study lives: Optuna storages from a URL, with secrets kept out of sight.

* ``None`` -> :class:`optuna.storages.InMemoryStorage` (one process; ``rmsprop compare``);
* ``journal:PATH`` -> :class:`optuna.storages.JournalStorage` on a
  :class:`optuna.storages.journal.JournalFileBackend` (several local processes, no server);
* any SQLAlchemy URL (``sqlite:///tune.db``, ``postgresql+psycopg2://user@host/db``...) ->
  :class:`optuna.storages.RDBStorage` with a heartbeat: a trial whose worker stopped beating for
  ``grace`` seconds is failed and re-queued with the same parameters by
  :class:`optuna.storages.RetryFailedTrialCallback` (unbounded retries: no point is lost).

:func:`open_storage` checks the driver and connects at once, so a missing driver or an
unreachable server is reported before any work starts. :func:`redact` hides a password in every
URL that is printed or logged; :func:`scrub` removes it from third-party error messages.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_STORAGE",
    "StorageError",
    "display_url",
    "has_heartbeat",
    "in_memory",
    "is_journal",
    "journal_path",
    "open_storage",
    "quiet_optuna",
    "redact",
    "retry_callback",
    "scrub",
]

DEFAULT_STORAGE = "sqlite:///rmsprop-tune.db"

#: SQLAlchemy dialect -> (default driver module, the extra that installs it)
_DRIVERS: dict[str, tuple[str, str]] = {
    "postgresql": ("psycopg2", "pip install 'rmsprop[postgres]'"),
    "mysql": ("MySQLdb", "pip install mysqlclient"),
}
#: SQLAlchemy driver name -> the module it imports
_DRIVER_MODULES = {"psycopg2": "psycopg2", "psycopg": "psycopg", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "pymysql": "pymysql", "mysqldb": "MySQLdb",
                   "mysqlconnector": "mysql.connector"}
#: SQLAlchemy driver name -> the package that installs it, where the names differ
_DRIVER_PACKAGES = {"mysqldb": "mysqlclient", "mysqlconnector": "mysql-connector-python"}


class StorageError(ValueError):
    """A storage the user can fix: bad URL, missing driver, unreachable server, missing folder."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``scheme://user:***@host/db``)."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def _password(url: str) -> str | None:
    if "://" in url and "@" in url:
        cred = url.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in cred:
            return cred.split(":", 1)[1] or None
    return None


def scrub(text: str, url: str | None) -> str:
    """``text`` with ``url`` and its password field (``:PASSWORD@``, ``password=PASSWORD``)
    redacted; a bare occurrence of the password is left, since a short one is also a piece of
    ordinary words (``on`` in "connection")."""
    if not url:
        return text
    text = text.replace(url, redact(url))
    pw = _password(url)
    if not pw:
        return text
    text = text.replace(f":{pw}@", ":***@")
    return re.sub(r"(password\s*=\s*['\"]?)" + re.escape(pw) + r"(?=['\"\s]|$)", r"\1***",
                  text)


def is_journal(url: str | None) -> bool:
    """Whether ``url`` names a journal file (``journal:PATH``)."""
    return bool(url) and str(url).startswith("journal:")


def journal_path(url: str) -> str:
    """The file of a ``journal:PATH`` URL (``journal:///abs``, ``journal://rel``, ``journal:p``)."""
    path = url[len("journal:"):]
    if path.startswith("//"):
        path = path[2:]
    return path


def display_url(url: str) -> str:
    """The URL to give ``optuna-dashboard``: absolute paths for files, password redacted."""
    if is_journal(url):
        return str(Path(journal_path(url)).resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
    return redact(url)


def quiet_optuna() -> None:
    """Keep Optuna's notices off the terminal: heartbeats and retries are 'experimental', and
    a failed trial is reported by the tuning code itself, in one line (Optuna would log the
    exception with its traceback, a KeyboardInterrupt included)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*RetryFailedTrial")
    warnings.filterwarnings("ignore", message="Heartbeat of storage")


def retry_callback() -> Any:
    """Optuna's retry callback: re-queues a failed trial's parameters as a WAITING trial
    (unbounded retries). Optuna 4.9 renamed ``RetryFailedTrialCallback`` to
    ``RetryHeartbeatStaleTrialCallback``; the older name stays for Optuna < 4.9."""
    import optuna.storages as st

    quiet_optuna()
    cls = getattr(st, "RetryHeartbeatStaleTrialCallback", None) or st.RetryFailedTrialCallback
    return cls(max_retry=None)


def _check_driver(url: str) -> None:
    """Raise :class:`StorageError` naming the package when the URL's database driver is missing
    (Optuna would say only "Failed to import DB access module")."""
    head = url.split("://", 1)[0]
    dialect, _, driver = head.partition("+")
    if dialect not in _DRIVERS:
        return
    module, install = _DRIVERS[dialect]
    if not driver:
        # a URL without a driver takes SQLAlchemy's default one, which differs between
        # SQLAlchemy versions (PostgreSQL: psycopg2 up to 2.0, psycopg from 2.1)
        try:
            from sqlalchemy.engine import make_url

            driver = str(make_url(url).get_dialect().driver)
        except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse: Optuna reports it
            driver = ""
        if dialect == "postgresql" and driver and driver != "psycopg2":
            install = (f"pip install '{driver}[binary]', or name psycopg2 in the URL "
                       f"(postgresql+psycopg2://...) after pip install 'rmsprop[postgres]'")
            module = _DRIVER_MODULES.get(driver, driver)
            driver = ""
    if driver:
        module = _DRIVER_MODULES.get(driver, driver)
        if driver != "psycopg2" or dialect != "postgresql":
            install = f"pip install {_DRIVER_PACKAGES.get(driver, driver)}"
    try:
        importlib.import_module(module)
    except ImportError:
        raise StorageError(f"storage {redact(url)} needs the {dialect} driver {module!r}, "
                           f"which is not installed: {install}") from None


def _sqlite_connect(path: str) -> Any:
    """A SQLite connection in WAL mode with ``synchronous=NORMAL``.

    Optuna commits several times per trial; with the default rollback journal every commit is
    an fsync, which costs seconds per trial on a busy disk. WAL keeps every committed trial
    through a killed process (only an OS crash may drop the last commits) and lets readers
    (progress bar, dashboard) work while a worker writes. Local workers wait up to 60 s for
    the lock instead of failing.
    """
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _journal(url: str) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = journal_path(url)
    if not path:
        raise StorageError("journal storage needs a path: journal:/path/to/study.log")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise StorageError(f"cannot open journal {path!r}: directory {parent} does not exist")
    try:
        return JournalStorage(JournalFileBackend(path))
    except OSError as e:
        raise StorageError(f"cannot open journal {path!r}: {e}") from None


def _refuse_non_database(path: Path, url: str) -> None:
    """Refuse an existing file that is not an SQLite database: SQLite would take a file
    shorter than its header (one of a few bytes) for an empty database and overwrite it."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise StorageError(f"cannot open {redact(url)!r}: {e.strerror or e}") from None
    if head != b"SQLite format 3\0":
        raise StorageError(f"cannot open {redact(url)!r}: {path} exists and is not an SQLite "
                           "database")


def _sqlite_db(url: str) -> str:
    """The database file of an ``sqlite`` URL; ``""`` or ``":memory:"`` for an in-memory one."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).database or ""
    except Exception as e:  # sqlalchemy's ArgumentError and friends: a malformed URL
        raise StorageError(f"bad storage URL {redact(url)!r}: {e}") from None


def in_memory(url: str | None) -> bool:
    """Whether the storage of ``url`` lives in one process only (None, ``sqlite://``,
    ``sqlite:///:memory:``), so that worker processes cannot share it."""
    return url is None or (str(url).startswith("sqlite")
                           and _sqlite_db(str(url)) in ("", ":memory:"))


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        db = _sqlite_db(url)
        if db and db != ":memory:":
            folder = Path(db).resolve().parent
            if not folder.is_dir():
                raise StorageError(f"cannot open {redact(url)!r}: directory {folder} "
                                   "does not exist")
            _refuse_non_database(Path(db), url)
            return {"creator": functools.partial(_sqlite_connect, db)}
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def open_storage(url: str | None, *, heartbeat: int = 10, grace: int = 30) -> Any:
    """An Optuna storage for ``url``, connected; raises :class:`StorageError` when it cannot
    be used (the message never shows a password)."""
    import optuna
    from optuna.storages import RDBStorage

    quiet_optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    if is_journal(url):
        return _journal(url)
    if "://" not in url:
        raise StorageError(f"bad storage URL {redact(url)!r}: expected e.g. sqlite:///tune.db, "
                           "postgresql+psycopg2://user@host/db or journal:/path/file.log")
    _check_driver(url)
    engine_kwargs = _engine_kwargs(url)
    callback_kw = "failed_trial_callback"
    if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage.__init__).parameters:
        callback_kw = "heartbeat_stale_trial_callback"  # the name since Optuna 4.9
    for attempt in range(6):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=grace, **{callback_kw: retry_callback()})
        except Exception as e:  # sqlalchemy raises many types; all mean "cannot use this URL"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # Workers started together on a fresh database race to create Optuna's tables;
            # the loser sees a duplicate-key/already-exists error and only has to retry.
            if attempt < 5 and any(k in msg for k in ("duplicate key", "already exists",
                                                      "UniqueViolation", "database is locked")):
                time.sleep(0.2 + 0.3 * attempt)
                continue
            raise StorageError(f"cannot open storage {redact(url)}: {scrub(msg, url)}") from None
    raise AssertionError("unreachable")


def has_heartbeat(storage: Any) -> bool:
    """Whether Optuna itself beats for trials in ``storage`` (an RDBStorage we opened with a
    heartbeat interval); journal files get the tuning worker's own beat instead."""
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
