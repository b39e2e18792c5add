"""`python -m pipeline.fake_claude`: run the fake Claude server from a shell."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from pipeline.fake_claude.models import CACHE_MIN_TOKENS
from pipeline.fake_claude.options import (
    DEFAULT_FAULTS,
    FakeOptions,
    parse_batch_error_rates,
    parse_cache_min_tokens,
    parse_faults,
)
from pipeline.fake_claude.rates import parse_error_rates
from pipeline.fake_claude.server import serve_forever

T = TypeVar("T")


def _arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser raising ValueError: argparse then shows the parser's message,
    not its own."""

    def convert(spec: str) -> T:
        try:
            return parse(spec)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake-claude", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--latency-jitter-ms", type=float, default=0.0)
    p.add_argument("--latency-sigma", type=float, default=0.0,
                   help="log-normal latency: --latency-ms is the median, this the sigma of its log (0.692: p99 = "
                        "5x the median; default 0, a steady latency)")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--faults", type=parse_faults, default=DEFAULT_FAULTS,
                   help="comma list drawn from by --fault-rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the fault draw and which jobs get wrong answers (default: 0)")
    p.add_argument("--stall-seconds", type=float, default=30.0)
    p.add_argument("--retry-after-s", type=float, default=1.0)
    p.add_argument("--api-key", default=None, help="accept only this x-api-key")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute per model class")
    p.add_argument("--itpm", type=int, default=None, help="input tokens per minute per model class")
    p.add_argument("--otpm", type=int, default=None, help="output tokens per minute per model class")
    p.add_argument("--rate-window-s", type=float, default=60.0,
                   help="the period --rpm, --itpm and --otpm are per (default: a minute)")
    p.add_argument("--cache-min-tokens", type=_arg_type(parse_cache_min_tokens), default={},
                   help="shortest cacheable prefix, as CLASS_OR_MODEL=TOKENS, comma-separated (default: "
                        + ",".join(f"{k}={v}" for k, v in CACHE_MIN_TOKENS.items()) + ")")
    p.add_argument("--error-rates", type=_arg_type(parse_error_rates), default=None,
                   help="turn the quality model on: 'default', CLASS.DIFFICULTY=RATE items (comma-separated, "
                        "* for all) or a TOML or JSON file; a wrong answer per model class and true difficulty")
    p.add_argument("--triage-noise", type=float, default=0.0,
                   help="share of triage verdicts replaced by another difficulty (default: 0)")
    p.add_argument("--batch-delay-s", type=float, default=0.0,
                   help="a message batch ends (its requests are processed) this many seconds after its "
                        "creation (default: 0)")
    p.add_argument("--batch-error-rates", type=_arg_type(parse_batch_error_rates), default={},
                   help="shares of message-batch requests that end errored, expired or canceled, as "
                        "errored=0.02,expired=0.01,canceled=0 (drawn from --seed; default: none)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = FakeOptions(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            latency_sigma=args.latency_sigma,
            fault_rate=args.fault_rate,
            faults=args.faults,
            seed=args.seed,
            stall_seconds=args.stall_seconds,
            retry_after_s=args.retry_after_s,
            api_key=args.api_key,
            rpm=args.rpm,
            itpm=args.itpm,
            otpm=args.otpm,
            rate_window_s=args.rate_window_s,
            cache_min_tokens=args.cache_min_tokens,
            error_rates=args.error_rates,
            triage_noise=args.triage_noise,
            batch_delay_s=args.batch_delay_s,
            batch_error_rates=args.batch_error_rates,
        )
    except ValueError as exc:
        parser.error(str(exc))
    serve_forever(host=args.host, port=args.port, options=options)
