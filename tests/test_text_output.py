"""The one text-output path: stop strings found incrementally, and streamed text equal to the
offline text wherever a stop string falls (inside a token, across tokens, at the first token)."""

import fakes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jdisagg.sched.params import SamplingParams
from jdisagg.text.output import TextOutput


class ByteTokenizer:
    """Token i decodes to PIECES[i] (bytes): hand-checkable, with a character split over two tokens."""

    PIECES = [
        b"The",
        b" cap",
        b"ital",
        b" of",
        b" Fr",
        b"ance",
        b" is",
        b" Par",
        b"is",
        b".",
        b" \xc3",
        b"\xa9t\xc3\xa9",
    ]
    eos_ids = (0,)

    def decode(self, ids) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


SENTENCE = list(range(10))  # "The capital of France is Paris."


def _stream(tokens, stop, shown_last=True):
    out = TextOutput(ByteTokenizer(), [], stop)
    pieces = []
    for i, t in enumerate(tokens):
        stopped = out.push(t, shown=shown_last or i < len(tokens) - 1)
        if stopped:
            break
        pieces.append(out.take())
    pieces.append(out.finish())
    return pieces, out


@pytest.mark.parametrize(
    "stop,text,tokens_used",
    [
        (("Paris.",), "The capital of France is ", 10),  # across three tokens
        (("is Par",), "The capital of France ", 8),  # across tokens, inside one
        (("France is",), "The capital of ", 7),
        (("capital of",), "The ", 4),
        (("e c",), "Th", 2),  # at the second token
        (("Th",), "", 1),  # at the first token
        (("apit",), "The c", 3),  # inside one token
        (("xyz", "of Fr", "ance"), "The capital ", 5),  # the earliest of several
        (("nothing",), "The capital of France is Paris.", 10),
    ],
)
def test_stop_strings_cut_the_text_and_the_stream_never_sends_past_them(stop, text, tokens_used):
    pieces, out = _stream(SENTENCE, stop)
    assert "".join(pieces) == out.text == text
    assert len(pieces) <= tokens_used + 1
    for i in range(len(pieces)):  # no prefix of the stream holds text the final text lacks
        assert text.startswith("".join(pieces[: i + 1]))


def test_held_back_text_comes_out_when_no_stop_string_completes():
    pieces, out = _stream([0, 1, 2], ("capitalism",))  # "The capital" could still become "capitalism"
    assert pieces == ["The", " ", "", "capital"] and out.text == "The capital"


def test_a_character_split_over_tokens_is_sent_whole():
    pieces, out = _stream([0, 10, 11], ())
    assert pieces == ["The", "", " été", ""] and out.text == "The été"


def test_a_stop_token_ends_the_text_without_its_own():
    pieces, out = _stream([0, 1, 3], (), shown_last=False)
    assert out.text == "The cap"


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(ByteTokenizer.PIECES) - 1), min_size=1, max_size=20),
    stop=st.lists(st.text(alphabet="Thecapitl ofFrnsP.é", min_size=1, max_size=6), max_size=3),
)
def test_streamed_text_is_the_full_text_cut_at_the_first_stop(tokens, stop):
    full = ByteTokenizer().decode(tokens)
    cuts = [full.find(s) for s in stop if s in full]
    pieces, out = _stream(tokens, tuple(stop))
    got = "".join(pieces)
    assert got == out.text
    if cuts:
        assert got == full[: min(cuts)]
    else:
        assert got == full


def test_engine_text_equals_the_stream_and_stops_at_a_string():
    """Through the scheduler: the offline text is what the stream sent, and a stop string ends
    the request as a stop."""

    class Digits:
        eos_ids = ()
        vocab_size = fakes.VOCAB
        longest_token_bytes = 3

        def decode(self, ids):
            return "".join(f"{i % 10}" for i in ids)

    engine = fakes.fake_engine(
        "page_size = 16\nmax_seq_len = 128\n[[prefill]]\ndevices = [0]\n[[decode]]\ndevices = [1]\npages = 20\n",
        tokenizer=Digits(),
    )
    seen = []
    r = engine.make_request([10], SamplingParams(max_tokens=30, stop=("456",)))
    r.listener = seen.append
    engine.submit(r)
    while not r.finished:
        engine.step()
    from jdisagg.engine import completion

    done = completion(r)
    assert done.text == "123" and done.finish_reason == "stop" and done.tokens == [11, 12, 13, 14, 15, 16]
    assert "".join(o.text for o in seen) == done.text and seen[-1].finished
