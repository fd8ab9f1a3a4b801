"""Progress reporting that suits where the output goes.

On a terminal a tqdm bar; on a pipe or a file (CI logs, ``hbmeta compare > log``) tqdm's
carriage returns pile up into dozens of copies per line, so there a plain line is printed
every ``every`` seconds and at the end instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """``total`` units of work, advanced with :meth:`update`; a context manager.

    Args:
        total: units of work (steps).
        desc: what is running, printed before the counts.
        enabled: ``False`` prints nothing.
        every: seconds between plain lines when the output is not a terminal.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, every: float = 10.0,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.stream = sys.stderr if stream is None else stream
        self.count, self.postfix = 0, ""
        self._bar = None
        self._start = self._last = time.perf_counter()
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream)

    def update(self, n: int = 1, **postfix: str) -> None:
        """Advance by ``n`` units; ``postfix`` (e.g. ``loss="1.23"``) is shown beside."""
        self.count += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every or self.count >= self.total:
            self._last = now
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._start
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.count}/{self.total} ({elapsed:.1f} s){extra}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
