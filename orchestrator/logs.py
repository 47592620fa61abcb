"""The one logging set-up of every entry point and worker process.

Our own INFO lines are the user's progress report (short: time and message); warnings and errors
say their level and logger. Chatty third-party loggers are held at WARNING: what Ray has to say at
INFO goes to the Ray session's log files (``/tmp/ray/session_*/logs``), not to the terminal.
"""

from __future__ import annotations

import logging

QUIET = ("ray", "filelock", "urllib3", "botocore", "s3fs", "fsspec", "aiobotocore", "matplotlib", "PIL", "submitit",
         "asyncio", "torch.distributed")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{stamp} {record.levelname} {record.name}: {message}"
        return f"{stamp} {message}"


def setup(verbose: bool = False) -> None:
    """Configure logging once per process; ``verbose`` shows DEBUG and third-party INFO.

    Where the root logger has handlers already (a Ray worker: Ray's console handler forwards to the
    driver and ``ray job logs``, its file handler writes JSON; pytest's capture), they are kept.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
