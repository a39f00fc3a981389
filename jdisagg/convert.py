"""Convert any model source into a jdisagg checkpoint (orbax), which later loads straight
onto each mesh with its own sharding:

    python -m jdisagg.convert --model smollm2-135m-instruct --out /tmp/smollm2
    python -m jdisagg.generate --model /tmp/smollm2 --prompt "Hello"
"""

from __future__ import annotations

import sys

from absl import app, flags

from jdisagg import cards, platform

_MODEL = flags.DEFINE_string("model", cards.DEFAULT_MODEL, "Model card name, card file, .gguf, or directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the checkpoint to (must not hold one yet).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the saved weights.")


def main(argv: list[str]) -> None:
    if len(argv) > 1 or not _OUT.value:
        print("jdisagg.convert: error: give --model and --out", file=sys.stderr)
        sys.exit(2)
    try:
        cards.write_checkpoint(_MODEL.value, _OUT.value, _DTYPE.value)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"jdisagg.convert: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    app.run(main)
