"""`picollm serve [STUDY | RUN | CHECKPOINT | HUB_ID ...]`: the playground page and an OpenAI-compatible API.

Loads every model once (a study directory brings all of its finished runs) and serves them on
127.0.0.1 unless --host says otherwise. See docs/serve.md for the endpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="STUDY|RUN|CHECKPOINT|HUB_ID",
                        help="study, run or checkpoint directories, or Hugging Face repo ids (user/name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("PICOLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on the API (default: $PICOLLM_API_KEY)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name the server answers to besides its IP addresses and localhost "
                             "(repeatable)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="most new tokens one request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                        help="longest prompt or scored text, in tokens")
    parser.add_argument("--workers", type=int, default=2, help="requests computed at once (threads)")
    parser.add_argument("--queue", type=int, default=16,
                        help="requests that may wait for a worker; more get 503 with Retry-After")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads (default: the CPU cores shared among the workers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="do not log every request")


def _check(args: argparse.Namespace) -> None:
    from picollm.errors import UserError

    for name, low in (("max_tokens", 1), ("max_prompt_tokens", 1), ("workers", 1), ("queue", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the flag out")


def run(args: argparse.Namespace) -> int:
    from picollm.errors import UserError

    _check(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("picollm serve needs the serve extra: pip install 'picollm[serve]'") from None
    import torch

    from picollm.device import resolve_device
    from picollm.serve.app import Settings, create_app
    from picollm.serve.catalog import load_catalog
    from picollm.serve.protocol import Limits
    from picollm.serve.server import bind, is_loopback, run_server, url_of

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.workers))
    sock = bind(args.host, args.port)  # first: a port in use is reported before minutes of loading
    try:
        catalog = load_catalog(args.sources, device=resolve_device(args.device))
        settings = Settings(Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens),
                            api_key=args.api_key, allowed_hosts=set(args.allowed_host), workers=args.workers,
                            queue_size=args.queue)
        app = create_app(catalog, settings)
        url = url_of(sock)
        print(f"[serve] {len(catalog.models)} models: {', '.join(catalog.models)}", file=sys.stderr)
        if not is_loopback(args.host):
            print(f"picollm serve: warning: listening on {args.host}, reachable from other machines; "
                  + ("requests need the API key" if args.api_key else "anyone who reaches it can use it: "
                     "pass --api-key"), file=sys.stderr)
        print(f"[serve] playground {url}/ , OpenAI API {url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        run_server(app, sock, access_log=args.access_log)
    finally:
        sock.close()
    return 0
