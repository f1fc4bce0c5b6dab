"""``tunesmith recipes {list,show,copy}``: browse the packaged recipes and copy one to edit and train."""

from __future__ import annotations

import argparse

from tunesmith.recipes.catalog import Recipe, copy_recipe, get_recipe, list_recipes


def format_table(recipes: list[Recipe]) -> str:
    """One row per recipe: name, guide, hardware, method, engine, title."""
    rows = [("NAME", "GUIDE", "HARDWARE", "METHOD", "ENGINE", "TITLE")]
    rows += [(r.name, r.guide_number, str(r.hardware), r.method, r.engine, r.title) for r in recipes]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)), row[5]]).rstrip()
             for row in rows]
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    print(format_table(list_recipes()))
    print("\nshow one: tunesmith recipes show NAME   copy it to edit: tunesmith recipes copy NAME DEST")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.name)
    print(str(recipe.path) if args.path else recipe.text, end="" if not args.path else "\n")
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.name)
    written = copy_recipe(args.name, args.dest, force=args.force)
    print(f"wrote {written}")
    print(f"edit: {recipe.edit}")
    print(f"then: {recipe.launch.replace(f'{recipe.name}.yaml', str(written), 1)}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipes", help="ready configs for the seed guides' setups (Qwen, InternLM2, Ascend, CPU): list, show, copy"
    )
    sub = p.add_subparsers(dest="recipes_command", metavar="SUBCOMMAND", required=True)
    q = sub.add_parser("list", help="name, guide, hardware, method and engine of every recipe")
    q.set_defaults(func=_cmd_list)
    q = sub.add_parser("show", help="print a recipe's YAML (its header says the hardware and the launch line)")
    q.add_argument("name", help="recipe name (see `tunesmith recipes list`)")
    q.add_argument("--path", action="store_true", help="print where the packaged file is instead")
    q.set_defaults(func=_cmd_show)
    q = sub.add_parser("copy", help="write a recipe to DEST to edit and train (never overwrites without --force)")
    q.add_argument("name", help="recipe name (see `tunesmith recipes list`)")
    q.add_argument("dest", help="a file path, or a folder to write NAME.yaml into")
    q.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    q.set_defaults(func=_cmd_copy)
