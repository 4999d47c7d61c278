"""Recipes: TRL-native YAML files run by ``hf-ftkit train``, each with its memory plan checked.

``load_recipe`` reads and validates a recipe (TRL's ``ScriptArguments``, ``ModelConfig`` and ``SFTConfig``
keys plus :class:`FtkitArguments`); ``plan_recipe`` plans it against its declared hardware; ``train``
runs it.
"""

from hf_ftkit.recipes.arguments import FtkitArguments, Hardware, parse_hardware
from hf_ftkit.recipes.loading import Recipe, load_recipe
from hf_ftkit.recipes.planning import RecipePlan, plan_recipe

__all__ = ["FtkitArguments", "Hardware", "Recipe", "RecipePlan", "load_recipe", "parse_hardware", "plan_recipe",
           "train"]


def __getattr__(name: str) -> object:
    if name == "train":  # imports the training stack; only when asked for
        from hf_ftkit.recipes.run import train

        return train
    raise AttributeError(name)
