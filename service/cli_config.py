"""`incar config show` (the effective configuration, each key with what it means) and `incar config profile-key`.

The meaning of a key is the comment on its line in the section's dataclass: the one place it is written, so the
listing cannot drift from the code. `show` loads exactly as `incar serve` does (embedded defaults, the YAML file,
INCAR_SECTION__KEY, --set), so it answers "what would the service run with?".
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import inspect
import io
import json
import os
import tokenize

from service.config import SECTIONS, add_config_arguments, config_from_args
from skills.config import PROFILE_KEY_ENV

SECRET_KEYS = ("profile_key", "password", "token")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: its trailing comment} from the dataclass's source (empty where a field has none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    above: list[str] = []          # a comment block on the lines just above a field describes it too
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in names and token.line.lstrip().startswith(token.string):
            if token.start[0] not in line_field and above:
                comments.setdefault(token.string, " ".join(above))
            line_field.setdefault(token.start[0], token.string)
            above = []
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("# ").strip()
            if token.start[0] in line_field:
                field = line_field[token.start[0]]
                comments[field] = f"{text}; {comments[field]}" if field in comments else text
            else:
                above.append(text)
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            above = [] if token.type != tokenize.NAME or token.string in names else above
    return comments


def flatten(obj, prefix: str) -> list[tuple[str, object, str]]:
    """(dotted key, value, meaning) for every leaf setting of a section, nested dataclasses included."""
    rows = []
    comments = field_comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            rows += flatten(value, key)
        else:
            shown = "(set)" if value and any(s in f.name for s in SECRET_KEYS) else value
            rows.append((key, shown, comments.get(f.name, "")))
    return rows


def show(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    rows = [row for name in SECTIONS for row in flatten(getattr(config, name), name)
            if not args.section or row[0].startswith(args.section + ".") or row[0] == args.section]
    if args.json:
        print(json.dumps({key: {"value": value, "meaning": meaning} for key, value, meaning in rows}, default=str))
        return 0
    width = max((len(key) for key, _, _ in rows), default=0)
    for key, value, meaning in rows:
        print(f"{key:<{width}} = {json.dumps(value, default=str)}" + (f"    # {meaning}" if meaning else ""))
    return 0


def profile_key(args: argparse.Namespace) -> int:
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    if args.json:
        print(json.dumps({"profile_key": key, "env": PROFILE_KEY_ENV}))
    else:
        print(key)
        print(f"# keep it out of the data directory: export {PROFILE_KEY_ENV}={key}  "
              "(or skills.greeter.profile_key in a config file only root can read)", flush=True)
    return 0


def config_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar config", description="The service's configuration")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    shown = sub.add_parser("show", help="the effective configuration, each key with its meaning")
    add_config_arguments(shown)
    shown.add_argument("section", nargs="?", default="", help="only this section or key prefix, e.g. cameras")
    shown.add_argument("--json", action="store_true", help="one JSON object {key: {value, meaning}}")
    key = sub.add_parser("profile-key", help="generate a key for the Greeter's face templates (AES-256-GCM)")
    key.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return show(args) if args.task == "show" else profile_key(args)
