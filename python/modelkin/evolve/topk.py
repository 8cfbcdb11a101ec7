"""Top-k greedy merging (Hu et al. 2024, Algorithm 1), with the kinship-guided exploration merge:
generation 1 merges every pair of the pool, later generations every not-yet-merged pair of the top
k, plus (exploring) the best model with the top-k model of lowest kinship. It stops when the top k
stop changing, when generations run out, or when every top-k pair is past the kinship threshold."""

from __future__ import annotations

from itertools import combinations

from . import strategies
from .driver import Driver, Outcome
from .recipes import pair_recipe


def run_topk(driver: Driver) -> Outcome:
    """Runs top-k greedy merging to its stop; the answer is the top model, scored on the test split."""
    settings = driver.config.topk
    history = {g: top for g, top, _ in driver.store.generations()}
    if 0 not in history:
        history[0] = [c.id for c in strategies.rank(driver.pool())[: settings.k]]
        driver.store.record_generation(0, history[0], None)
    stop = f"{settings.generations} generations done"
    for generation in range(1, settings.generations + 1):
        # Decisions of generation g see only what generations before g made: on resume, the
        # children of g already in the store must not change g's own choice of parents.
        population = [c for c in driver.population() if c.generation < generation]
        top = strategies.rank(population)[: settings.k]
        merged = strategies.merged_pairs(population)
        tops = [history[g] for g in sorted(history) if g < generation]
        if generation == 1:
            pool = strategies.rank(driver.pool())
            pairs = [(a.id, b.id) for a, b in combinations(pool, 2)]
        else:
            if strategies.unchanged_for(tops, settings.patience):
                stop = f"top {settings.k} unchanged for {settings.patience} generation(s)"
                break
            pairs = strategies.topk_pairs(top, merged)
        explore = settings.explore == "kinship" and generation > 1 and bool(top)
        taken = merged | {strategies.pair_key(a, b) for a, b in pairs}
        options = [
            c
            for c in population
            if explore
            and c.status == "done"
            and c.id != top[0].id
            and strategies.pair_key(top[0].id, c.id) not in taken
        ]
        # One kinship pass per generation covers the stop rule (top k), the exploration
        # choice (best against every option) and the parents of every proposed merge.
        parents = [driver.store.get(i) for pair in pairs for i in pair]
        driver.measure_kinship(list({c.id: c for c in [*top, *options, *parents]}.values()))
        if (
            generation > 1
            and settings.stop_kinship is not None
            and (strategies.kinship_saturated(top, driver.kinship, settings.metric, settings.stop_kinship))
        ):
            stop = f"kinship ({settings.metric}) of every top-{settings.k} pair past {settings.stop_kinship}"
            break
        roles = ["merge"] * len(pairs)
        if explore:
            partner = strategies.explore_partner(top[0], options, taken, driver.kinship, settings.metric)
            if partner is not None:
                pairs.append((top[0].id, partner.id))
                roles.append("explore")
        if not pairs:
            stop = "every pair of the top k is merged already"
            break
        children = []
        for (a, b), role in zip(pairs, roles, strict=True):
            first, second = driver.store.get(a), driver.store.get(b)
            path_a, path_b = driver.model_path(first), driver.model_path(second)
            recipe = pair_recipe(driver.config.merge, path_a, path_b, driver.base_path_required())
            children.append(driver.propose(generation, role, [first, second], recipe))
        driver.score_many([(child, "search") for child in children])
        if generation not in history:
            history[generation] = [c.id for c in strategies.rank(driver.population())[: settings.k]]
            driver.store.record_generation(generation, history[generation], None)
        driver.prune(history[generation])
    final = strategies.rank(driver.population())[: settings.k]
    driver.score_many([(candidate, "test") for candidate in final])
    return Outcome(driver.store.get(final[0].id), stop)
