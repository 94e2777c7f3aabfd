"""Where the cluster's replicas leave their metrics for the ingress's /metrics (a Ray actor).

Each replica sends its Prometheus text every few seconds; the ingress reads every replica's latest
text that is recent enough (a replica that stopped reporting, e.g. one that died, drops out) and
merges them under a `replica` label (metrics.py).
"""

from __future__ import annotations

import time

METRICS_BOARD_ACTOR = "loraplex-metrics-board"
REPORT_SECONDS = 2.0  # how often a replica reports
STALE_SECONDS = 30.0  # a report older than this is left out


class MetricsBoard:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self._reports[replica] = (time.monotonic(), text)

    def forget(self, replica: str) -> None:
        """A replica that stops gracefully leaves at once (one that dies drops out after STALE_SECONDS)."""
        self._reports.pop(replica, None)

    def texts(self) -> dict[str, str]:
        now = time.monotonic()
        for replica in [r for r, (at, _) in self._reports.items() if now - at > STALE_SECONDS]:
            del self._reports[replica]
        return {replica: text for replica, (_, text) in sorted(self._reports.items())}
