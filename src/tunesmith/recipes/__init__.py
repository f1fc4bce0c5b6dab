"""Recipes: ready configs for the seed guides' setups (``tunesmith recipes list | show NAME | copy NAME DEST``)."""

from tunesmith.recipes.catalog import (
    Hardware,
    Recipe,
    copy_recipe,
    get_recipe,
    list_recipes,
    packaged_identity_dir,
    parse_hardware,
    plan_recipe,
    recipe_names,
    recipes_dir,
)

__all__ = [
    "Hardware",
    "Recipe",
    "copy_recipe",
    "get_recipe",
    "list_recipes",
    "packaged_identity_dir",
    "parse_hardware",
    "plan_recipe",
    "recipe_names",
    "recipes_dir",
]
