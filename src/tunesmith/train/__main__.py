"""``python -m tunesmith.train [CONFIG] [key=value ...]``: train from a YAML config (re-running resumes)."""

from __future__ import annotations

import sys

from tunesmith.errors import TunesmithError
from tunesmith.logging import get_logger, setup_logging


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    setup_logging()
    config = args.pop(0) if args and "=" not in args[0] else None
    try:
        from tunesmith.config import load_config
        from tunesmith.train import train

        result = train(load_config(config, args))
    except TunesmithError as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 2
    get_logger("train").info(
        "training finished: step %d, final loss %.6f, run folder %s",
        result.global_step,
        result.final_loss,
        result.output_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
