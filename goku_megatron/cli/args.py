"""argparse value types the console scripts share: a bad value is refused at parse time, in
argparse's one line, before anything is read or built."""

from __future__ import annotations

import argparse

from goku_megatron.data.toy import parse_colors


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def color_list(text: str) -> tuple[str, ...]:
    """``red,green,blue`` -> ("red", "green", "blue"); an unknown name is refused."""
    try:
        return parse_colors(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
