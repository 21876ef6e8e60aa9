"""Repeat the always-on honest-profile rounds on gunicorn gthread and summarise them.

``tests/e2e/test_honest.py``'s WSGI case sends 8 concurrent requests per way of running
work once per test run; the figures of one such round swing widely on a shared machine.
This sends ``--rounds`` such rounds to one server (gunicorn gthread, 8 threads, the honest
Flask app) and prints, per case, each round's median share of the time its marker ran (as
the app reports it), the pooled median, and how many requests had no sample inside their
marker. Compare two builds by running it from each checkout in turn (alternating, several times).

    python -m bench.honest_rounds --rounds 6 [--mode always_on|hook]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e import test_honest as honest
from tests.e2e.attribution import attribute
from tests.e2e.servers import gunicorn, run_server
from tests.helpers import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--mode", choices=["always_on", "hook"], default="always_on")
    args = parser.parse_args()
    port = free_port()
    command = gunicorn("tests.e2e.honest_flask:app", port, workers=1, threads=8)
    env = {"OTELPROF_MODE": args.mode, "OTELPROF_MIN_DURATION_MS": "0"}  # (keep every one)
    rounds: dict[str, list[float]] = {case: [] for case in honest.WSGI_CASES}
    shares: dict[str, list[float]] = {case: [] for case in honest.WSGI_CASES}
    with run_server(command, Path(tempfile.mkdtemp()), port=port, env=env) as server:
        for _ in range(args.rounds):
            sent = []
            with ThreadPoolExecutor(8) as pool:
                for index, case in enumerate(honest.WSGI_CASES):
                    numbers = range(8 * index, 8 * index + 8)
                    sent.extend(
                        pool.map(lambda n, c=case: honest._send(server.base_url, c, n), numbers)
                    )
            records = honest._stored(server, [s.trace_id for s in sent])
            for case in honest.WSGI_CASES:
                fractions = [
                    attribute(records[s.trace_id].session(), s.n).own_fraction(s.marker_seconds)
                    for s in sent
                    if s.case == case and s.trace_id in records
                ]
                rounds[case].append(statistics.median(fractions))
                shares[case].extend(fractions)
    for case in honest.WSGI_CASES:
        medians = ", ".join(f"{m:.2f}" for m in rounds[case])
        unseen = sum(share == 0 for share in shares[case])
        print(
            f"{case:12s} round medians [{medians}]  pooled {statistics.median(shares[case]):.2f}"
            f"  no sample in marker {unseen}/{len(shares[case])}"
        )


if __name__ == "__main__":
    main()
