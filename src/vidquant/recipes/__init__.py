"""Recipes: a pydantic schema, bundled YAML recipes, and the layer selection (`plan`) they drive."""

from vidquant.recipes.schema import (
    DEFAULT_ALPHA,
    DEFAULT_EPS,
    DEFAULT_PERCENTILE,
    Recipe,
    Smoothing,
    load_recipe,
    recipe_names,
)
from vidquant.recipes.select import Plan, matches, plan

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_EPS",
    "DEFAULT_PERCENTILE",
    "Plan",
    "Recipe",
    "Smoothing",
    "load_recipe",
    "matches",
    "plan",
    "recipe_names",
]
