"""The greedy soup (Wortsman et al. 2022): ingredients in order of their held-out score, each kept
when the soup's score does not drop; the uniform soup of every ingredient is the reference row."""

from __future__ import annotations

from . import strategies
from .driver import Driver, Outcome
from .recipes import soup_recipe
from .store import Candidate


def run_soup(driver: Driver) -> Outcome:
    """Builds the greedy soup beside the uniform soup; the answer is the final greedy soup."""
    ranked = strategies.rank(driver.pool())
    merge_section = driver.config.merge
    everything = [driver.model_path(c) for c in driver.pool()]
    uniform = driver.store.add(
        "uniform_soup",
        1,
        "uniform_soup",
        parents=[c.id for c in driver.pool()],
        recipe=soup_recipe(merge_section, everything),
    )

    def trial(ingredients: list[Candidate], step: int) -> Candidate:
        recipe = soup_recipe(merge_section, [driver.model_path(c) for c in ingredients])
        key = "soup:" + ",".join(str(c.id) for c in ingredients)
        return driver.store.add(key, step, "soup", parents=[c.id for c in ingredients], recipe=recipe)

    soup = [ranked[0]]
    current = ranked[0]
    # The uniform soup does not depend on the greedy steps: it runs beside the first one.
    first = [(trial([ranked[0], ranked[1]], 2), "search")] if len(ranked) > 1 else []
    driver.score_many([(uniform, "search"), *first])
    for step, ingredient in enumerate(ranked[1:], start=2):
        candidate = driver.score(trial([*soup, ingredient], step), "search")
        if candidate.status != "done" or current.objective_search is None:
            continue
        assert candidate.objective_search is not None
        compare = driver.config.greedy_soup.compare
        if strategies.soup_accepts(candidate.objective_search, current.objective_search, compare):
            soup, current = [*soup, ingredient], candidate
    driver.score_many([(candidate, "test") for candidate in (uniform, current)])
    kept = ", ".join(c.label for c in soup)
    return Outcome(driver.store.get(current.id), f"greedy soup of {len(soup)} ingredient(s): {kept}")
