"""Uptraining of converted checkpoints with accelerate: YAML recipes, distillation, exact resume."""

from kvshrink.uptrain.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "uptrain"]


def __getattr__(name: str):
    # torch and accelerate load only when training starts, so `uptrain --help` and recipe checks stay quick
    if name == "uptrain":
        from kvshrink.uptrain.trainer import uptrain

        return uptrain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
