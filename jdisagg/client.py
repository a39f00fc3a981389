"""The command-line client for a jdisagg server, and the public import path of the client library.

    python -m jdisagg.client "Once upon a time"                    # stream the text to stdout
    python -m jdisagg.client --target host:50051 --max_tokens 16 --json "Once upon a time"
    python -m jdisagg.client --chat                                # chat: one user message per line
    python -m jdisagg.client --root_cert cert.pem --api_key KEY "Hi"  # a server with --tls_cert and --api_key

Errors print ``jdisagg.client: error: CODE: details`` and exit with 2 for INVALID_ARGUMENT and
NOT_FOUND, 1 for any other code. The library (``Client``, ``AsyncClient``) lives in
``jdisagg.serving.client``; this module re-exports it.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from typing import TextIO

import grpc
from absl import app, flags

from jdisagg.serving.access import key_from_env
from jdisagg.serving.client import DEFAULT_TARGET, AsyncClient, Client, Completion, ResponseStream

__all__ = ["AsyncClient", "Client", "Completion", "ResponseStream", "main"]


# ---- command line ---------------------------------------------------------------------------


def _define_flags() -> None:
    """The command line's flags; defined only when it runs, so importing the library defines none."""
    flags.DEFINE_string("target", DEFAULT_TARGET, "Server address, host:port.")
    flags.DEFINE_string("api_key", None, "Bearer key of a server started with --api_key (default $JDISAGG_API_KEY).")
    flags.DEFINE_bool("tls", False, "Connect over TLS, trusting the system's root certificates.")
    flags.DEFINE_string("root_cert", None, "Connect over TLS, trusting this PEM certificate (e.g. the server's own).")
    flags.DEFINE_integer("max_tokens", 0, "Most tokens to generate; 0 takes the server's default (64).")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
    flags.DEFINE_integer("top_k", 0, "Top-k cut; 0 keeps all.")
    flags.DEFINE_integer("seed", None, "Sampling seed; unset leaves it to the server.")
    flags.DEFINE_multi_string("stop", [], "Stop string; repeatable.")
    flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
    flags.DEFINE_bool("chat", False, "Chat: read one user message per line from stdin until EOF or /exit.")
    flags.DEFINE_bool("json", False, "Print one JSON object per response message instead of text.")


_USAGE_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)  # exit 2; other codes exit 1


def _fail(message: str, status: int = 2) -> None:
    print(f"jdisagg.client: error: {message}", file=sys.stderr)
    sys.exit(status)


def _to_dict(message) -> dict:
    """A message as plain JSON values (unlike json_format, 64-bit integers stay numbers)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is None:
            out[field.name] = list(value) if field.is_repeated else value
        else:
            out[field.name] = [_to_dict(v) for v in value] if field.is_repeated else _to_dict(value)
    return out


def _print_stream(stream: ResponseStream, as_json: bool, out: TextIO) -> str:
    """Writes a Generate stream to ``out`` and returns its text."""
    text = []
    with stream:
        for response in stream:
            text.append(response.text)
            if as_json:
                message = _to_dict(response)
                if not response.HasField("final"):
                    del message["final"]
                print(json.dumps(message), file=out, flush=True)
            else:
                print(response.text, end="", file=out, flush=True)
    if not as_json:
        print(file=out, flush=True)
    return "".join(text)


def _user_lines(stdin: TextIO) -> Iterator[str]:
    """Non-empty lines from ``stdin`` until EOF or "/exit"; a "> " prompt on stderr when interactive."""
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


def main(argv: list[str]) -> None:
    if len(argv) > 2:
        _fail(f"give the prompt as one argument (quote it), not {argv[1:]}")
    prompt = argv[1] if len(argv) == 2 else None
    if prompt is None and not flags.FLAGS.chat:
        _fail("give a prompt, or --chat to read messages from stdin")
    sampling = dict(
        max_tokens=flags.FLAGS.max_tokens,
        temperature=flags.FLAGS.temperature,
        top_p=flags.FLAGS.top_p,
        top_k=flags.FLAGS.top_k,
        seed=flags.FLAGS.seed,
        stop=flags.FLAGS.stop,
        ignore_eos=flags.FLAGS.ignore_eos,
    )
    try:
        secured = dict(api_key=key_from_env(flags.FLAGS.api_key), tls=flags.FLAGS.tls, root_cert=flags.FLAGS.root_cert)
        with Client(flags.FLAGS.target, **secured) as client:
            if not flags.FLAGS.chat:
                _print_stream(client.generate(prompt, **sampling), flags.FLAGS.json, sys.stdout)
                return
            messages = []
            opening = [prompt] if prompt is not None else []  # a prompt opens the conversation
            for line in itertools.chain(opening, _user_lines(sys.stdin)):
                messages.append({"role": "user", "content": line})
                answer = _print_stream(client.generate(messages, **sampling), flags.FLAGS.json, sys.stdout)
                messages.append({"role": "assistant", "content": answer})
    except (ValueError, OSError) as e:  # a sampling value the request cannot hold; an unreadable --root_cert
        _fail(str(e))
    except grpc.RpcError as e:
        _fail(f"{e.code().name}: {e.details()}", 2 if e.code() in _USAGE_CODES else 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
