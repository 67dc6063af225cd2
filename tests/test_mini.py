"""The mini scale's recipe: one recipe for every row of a table, on the real digits scans, seeds by default."""

import suites


def test_every_runnable_table_has_one_mini_recipe_with_seeds():
    for table in suites.TABLES.values():
        if "mini" not in table.recipes:
            continue
        recipe = table.recipes["mini"]
        assert recipe.dataset == "digits" and recipe.resolution == 32, table.key
        assert recipe.seeds == 3 and recipe.seed_spread > 0, table.key
        assert recipe.warmup_epochs > 0 or recipe.warmup_iters > 0, table.key  # many-branch blocks need a gentle start
