"""Runs the Autobahn TestSuite cases (kosoku's runner) against a WebSocket server.

usage: python fuzzingclient.py ws://127.0.0.1:PORT [--parallel N] [--include CASE]...
       [--exclude CASE]...

Exit status 0 only if every case's behaviour and close behaviour are OK, NON-STRICT or
INFORMATIONAL; otherwise each failing case is printed with the runner's explanation. The last
line is the plain "N passed, N failed" summary.
"""

import argparse
import asyncio
import os
import sys
import time

import kosoku.cases
from kosoku import FailureError, run_fuzzingclient

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}


def bytes_for_compression_cases():
    """kosoku 0.1.0 hands the 12.*/13.* cases an uncompressed message (RSV1 clear, which RFC
    7692 allows and our server sends when compressing does not pay) as a `str`, binary messages
    included, where Autobahn's case file wants the bytes it sent, so it fails hashing them. Give
    the case the bytes back (py2 `str` semantics: latin-1, as kosoku's own b2a_hex shim does). The
    case still compares the SHA-1 of every echoed message with what it sent, so a wrong
    conversion could only fail a case, never pass one."""
    for case_id, case in kosoku.cases.CASES.items():
        if case_id.split(".")[0] not in ("12", "13"):
            continue
        original = case.onMessage

        def on_message(self, msg, binary, original=original):
            if isinstance(msg, str):
                try:
                    msg = msg.encode("latin-1")
                except UnicodeEncodeError:
                    msg = msg.encode("utf-8")
            return original(self, msg, binary)

        case.onMessage = on_message


async def run(url, include, exclude, parallel):
    try:
        return await run_fuzzingclient(url, include, exclude, concurrency=parallel)
    except FailureError as failure:
        return failure.results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--include", action="append")
    parser.add_argument("--exclude", action="append")
    args = parser.parse_args()
    bytes_for_compression_cases()
    started = time.monotonic()
    results = asyncio.run(run(args.url, args.include, args.exclude, args.parallel))
    elapsed = time.monotonic() - started
    failed = []
    groups = {}
    for result in results:
        behavior = result.behavior.value
        close = result.behavior_close.value
        group = result.case_id.split(".")[0]
        count, millis = groups.get(group, (0, 0))
        groups[group] = (count + 1, millis + result.duration)
        if behavior not in ACCEPTABLE or close not in ACCEPTABLE:
            failed.append(result)
            print(
                f"case {result.case_id}: {behavior} / close {close}: {result.result} "
                f"| {result.result_close} | {result.description}",
                file=sys.stderr,
            )
    for group in sorted(groups, key=int):
        count, millis = groups[group]
        print(f"  {group}.*: {count} cases, {millis / 1000:.1f} s of case time")
    slowest = sorted(results, key=lambda r: r.duration, reverse=True)[:5]
    print("  slowest: " + ", ".join(f"{r.case_id} {r.duration} ms" for r in slowest))
    print(f"autobahn: {len(results)} cases in {elapsed:.1f} s (parallelism {args.parallel})")
    if not results:
        print("autobahn: no case ran", file=sys.stderr)
        return 1
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The verdict is final here. Interpreter teardown with kosoku's runner has been seen to
    # abort (SIGABRT after "517 passed, 0 failed" was printed), so it is skipped.
    os._exit(code)
