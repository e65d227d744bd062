"""Read the generator's ground truth back and score its oracle: the ceiling of what a model can learn.

:func:`oracle_item_scores` is the generator's own probability that each product is in a basket,
given the basket's latent context (customer, store, week, mission, focus) and the products already
visible in it. It reuses the generator's functions (:func:`generator.category_probs`,
:func:`generator.product_choice_weights`), so the oracle and the sampler cannot drift apart.

:func:`measure_recall` is the planted-structure check: in the last 10 % of weeks, hide one line per
basket of >= 2 lines and compare Recall@K of global popularity (line frequency over the first 80 %
of weeks) with the oracle. Nothing here is ever a model feature.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retailsim_pipeline.prep.generator import (
    MAX_STAPLES,
    N_SENS_GROUPS,
    WORLD_NAME,
    World,
    category_probs,
    product_choice_weights,
)
from retailsim_pipeline.prep.schema import weekly_file_name, week_code


def load_world(ground_truth_dir: Path) -> World:
    """The :class:`World` saved by :func:`generator.generate` in ``ground_truth_dir``."""
    path = Path(ground_truth_dir) / WORLD_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the generator first (generate(config, data_root))")
    with np.load(path, allow_pickle=False) as npz:
        return World(**{f.name: npz[f.name] for f in dataclasses.fields(World)})


@dataclass(frozen=True)
class BasketContext:
    """Latent context of B baskets (from ``baskets_YYYYWW.parquet``), all [B] int arrays."""

    customer: np.ndarray  # customer index, -1 anonymous
    store: np.ndarray
    week: np.ndarray  # week index (0 = 200607)
    mission: np.ndarray
    focus: np.ndarray

    def __len__(self) -> int:
        return len(self.customer)

    def take(self, idx: np.ndarray | slice) -> "BasketContext":
        return BasketContext(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def _as_csr(visible: tuple[np.ndarray, np.ndarray] | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(visible, tuple):
        return np.asarray(visible[0], dtype=np.int64), np.asarray(visible[1], dtype=np.int64)
    lengths = np.array([len(v) for v in visible], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate(visible).astype(np.int64) if len(visible) else np.zeros(0, dtype=np.int64)
    return offsets, items


def oracle_item_scores(
    world: World,
    baskets: BasketContext,
    visible: tuple[np.ndarray, np.ndarray] | list[np.ndarray],
    *,
    chunk: int = 2048,
) -> np.ndarray:
    """Generator probability that each product is (also) in each basket, [B, P] float32.

    ``visible`` is CSR ``(offsets [B+1], product indices)`` or a list of index arrays. With r the
    customer's repeat propensity (0 if anonymous), a slot yields product p with probability
    ``m_slot(p) = r * staple_weight(p) + (1 - r) * P(cat(p) | basket) * P(p | cat, store, sens, week)``,
    zero where the store does not carry p; the basket has about ``n = |visible| + 1`` slots, so
    ``m = n * m_slot``. Visible items add their complements (``+ complement_prob(v)`` on
    partner(v)); a visible v that is p's partner raises p by Bayes:
    ``m_p (c_p + m_v) / (m_p (c_p + m_v) + (1 - m_p) m_v)``. Visible products themselves keep
    their score; callers exclude them from rankings.
    """
    offsets, items = _as_csr(visible)
    B, P = len(baskets), world.n_products
    out = np.zeros((B, P), dtype=np.float32)
    within_cache: dict[int, np.ndarray] = {}
    seg_cat = world.prod_dep

    def within_category(week: int) -> np.ndarray:
        """P(p | cat(p), group) for one week, [S*4, P]."""
        if week not in within_cache:
            w = product_choice_weights(world, week)
            seg = np.add.reduceat(w, world.cat_start, axis=1)  # [G, K] category masses
            within_cache[week] = w / np.where(seg > 0, seg, 1.0)[:, seg_cat]
        return within_cache[week]

    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        ctx = baskets.take(slice(lo, hi))
        b = hi - lo
        rows = np.arange(b)
        cust = ctx.customer.astype(np.int64)
        c0 = np.maximum(cust, 0)
        r = np.where(cust >= 0, world.repeat_prop[c0], 0.0)[:, None]
        cat_p = category_probs(world, cust, ctx.focus.astype(np.int64), ctx.week.astype(np.int64))  # [b, K]
        group = ctx.store.astype(np.int64) * N_SENS_GROUPS + world.customer_sens_group(cust)
        within = np.empty((b, P))
        for wk in np.unique(ctx.week):
            sel = ctx.week == wk
            within[sel] = within_category(int(wk))[group[sel]]
        m_slot = (1.0 - r) * cat_p[:, seg_cat] * within
        # staples (unique per customer, so the scatter has no collisions)
        st = world.staples[c0]  # [b, MAX_STAPLES]
        ok = (st >= 0) & (cust >= 0)[:, None]
        sr = np.repeat(rows, MAX_STAPLES).reshape(b, MAX_STAPLES)[ok]
        sp = st[ok]
        avail = world.assortment[ctx.store[sr], sp]
        m_slot[sr, sp] += (r[:, 0][sr] * world.staple_weight[c0][ok] * avail)
        n_vis = np.diff(offsets[lo : hi + 1])
        m = np.minimum(m_slot * (n_vis + 1)[:, None], 0.999)

        vis_rows = np.repeat(rows, n_vis)
        vis = items[offsets[lo] : offsets[hi]]
        if len(vis):
            # reverse: p whose partner v is visible (bread visible → butter? no: butter visible → bread)
            cand = np.flatnonzero(np.isin(world.complement, vis))  # small set of products
            if len(cand):
                # pairs (basket row, p) with complement[p] visible in that basket
                vis_key = np.unique(vis_rows * P + vis)
                pr = np.repeat(rows, len(cand))
                pp = np.tile(cand, b)
                hit = np.isin(pr * P + world.complement[pp], vis_key)
                pr, pp = pr[hit], pp[hit]
                mp, mv = m[pr, pp], m[pr, world.complement[pp]]
                cp = world.complement_prob[pp]
                num = mp * (cp + mv)
                m[pr, pp] = num / np.maximum(num + (1.0 - mp) * mv, 1e-12)
            # forward: the partner of a visible product is added with its complement probability
            partner = world.complement[vis]
            add = world.complement_prob[vis] * world.assortment[ctx.store[vis_rows], partner]
            np.add.at(m, (vis_rows, partner), add)
        m *= world.assortment[ctx.store]
        out[lo:hi] = m
    return out


def _read_lines(data_root: Path, weeks: list[int]) -> pl.DataFrame:
    """(week, basket, product index) of the given week indices' raw files, in file order."""
    files = [str(Path(data_root) / "raw" / weekly_file_name(week_code(w))) for w in weeks]
    return (
        pl.scan_csv(files, schema_overrides={"BASKET_ID": pl.Int64, "SHOP_WEEK": pl.Int32})
        .select(
            "SHOP_WEEK",
            "BASKET_ID",
            (pl.col("PROD_CODE").str.slice(3).cast(pl.Int64) - 900_001).alias("product"),
        )
        .collect()
    )


def measure_recall(
    data_root: Path,
    *,
    k: int = 10,
    seed: int = 0,
    test_fraction: float = 0.1,
    history_fraction: float = 0.8,
    max_baskets: int | None = None,
) -> dict[str, float]:
    """Recall@k of global popularity vs the oracle on one hidden line per test basket.

    Test baskets: those of >= 2 lines in the last ``test_fraction`` of weeks; one line hidden at
    random (``seed``). Popularity = line frequency over the first ``history_fraction`` of weeks.
    Both rankings exclude the basket's visible products.
    """
    data_root = Path(data_root)
    world = load_world(data_root / "ground_truth")
    n_weeks = world.promo_discount.shape[0]
    n_test = max(1, round(test_fraction * n_weeks))
    n_hist = max(1, int(history_fraction * n_weeks))
    P = world.n_products

    hist = _read_lines(data_root, list(range(n_hist)))
    popularity = np.bincount(hist["product"].to_numpy(), minlength=P).astype(np.float64)

    test_weeks = list(range(n_weeks - n_test, n_weeks))
    lines = _read_lines(data_root, test_weeks)
    truth = pl.concat(
        [pl.read_parquet(data_root / "ground_truth" / f"baskets_{week_code(w)}.parquet") for w in test_weeks]
    )
    basket_id = lines["BASKET_ID"].to_numpy()
    product = lines["product"].to_numpy()
    starts = np.flatnonzero(np.r_[True, basket_id[1:] != basket_id[:-1]])
    lengths = np.diff(np.r_[starts, len(basket_id)])
    keep = lengths >= 2
    starts, lengths = starts[keep], lengths[keep]
    rng = np.random.default_rng(seed)
    if max_baskets is not None and len(starts) > max_baskets:
        pick = np.sort(rng.choice(len(starts), max_baskets, replace=False))
        starts, lengths = starts[pick], lengths[pick]
    hidden_pos = starts + (rng.random(len(starts)) * lengths).astype(np.int64)
    hidden = product[hidden_pos]
    # visible lines: every line of the chosen baskets except the hidden one
    line_rows = np.repeat(np.arange(len(starts)), lengths)
    line_pos = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    vis_mask = line_pos != hidden_pos[line_rows]
    vis_items = product[line_pos[vis_mask]]
    offsets = np.r_[0, np.cumsum(lengths - 1)]

    ctx_frame = pl.DataFrame({"BASKET_ID": basket_id[starts]}).join(truth, on="BASKET_ID", how="left",
                                                                    maintain_order="left")
    ctx = BasketContext(
        customer=ctx_frame["customer_index"].to_numpy(),
        store=ctx_frame["store_index"].to_numpy(),
        week=ctx_frame["week_index"].to_numpy(),
        mission=ctx_frame["mission"].to_numpy(),
        focus=ctx_frame["focus"].to_numpy(),
    )
    vis_rows = np.repeat(np.arange(len(starts)), lengths - 1)

    def recall(scores: np.ndarray, lo: int) -> int:
        scores = scores.astype(np.float64, copy=True)
        rows = vis_rows[offsets[lo] : offsets[lo + len(scores)]] - lo
        scores[rows, vis_items[offsets[lo] : offsets[lo + len(scores)]]] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        return int((top == hidden[lo : lo + len(scores), None]).any(1).sum())

    hits_pop = hits_oracle = 0
    chunk = 2048
    for lo in range(0, len(starts), chunk):
        hi = min(len(starts), lo + chunk)
        # tiny deterministic tie-break so popularity's top-k is well defined
        pop = np.broadcast_to(popularity + np.arange(P) * 1e-9, (hi - lo, P))
        hits_pop += recall(pop, lo)
        sub = (offsets[lo : hi + 1] - offsets[lo], vis_items[offsets[lo] : offsets[hi]])
        hits_oracle += recall(oracle_item_scores(world, ctx.take(slice(lo, hi)), sub), lo)
    n = len(starts)
    return {
        "baskets": float(n),
        "popularity_recall": hits_pop / max(n, 1),
        "oracle_recall": hits_oracle / max(n, 1),
    }
