"""Seeded generator of synthetic shopping transactions in the exact LGSR file format.

It stands in for the dunnhumby "Let's Get Sort-of-Real" dataset: it writes one
``raw/transactions_YYYYWW.csv`` per shop week with the 22 columns of :data:`schema.LGSR_COLUMNS`,
so the ingestion code reads generated and real files alike. Beside them, ``ground_truth/`` holds the
world it was drawn from (never a feature; it lets :mod:`ground_truth` score an oracle ceiling).

Generative model
----------------
**World** (:func:`build_world`, drawn once from ``SeedSequence(seed, spawn_key=(0,))``):

* Products sit in a 4-level tree D (coarsest, 3-5) > G (10-20) > DEP (~P/60) > CL (~P/15) > product;
  products are numbered in tree order, so every node owns a contiguous index range. A DEP is a
  *category*: the unit of customer preferences and seasonality. Each D has a kind (Fresh, Grocery,
  Nonfood) that its subtree inherits. Each product has a price tier (budget/mid/premium), a
  lognormal base price by kind and tier, a Zipf popularity, and one complementary partner in another
  category of the same G (or D) that is added to the basket with the product's complement probability.
  Categories have a seasonal amplitude and phase.
* Stores have a format (XLS carries everything, LS ~90 %, MS ~70 %, SS ~45 % of products, favouring
  the popular ones), a region (``E01`` ...), a traffic weight; ~3 % of products are regional.
* Customers have a lifestage, a true price sensitivity (LA/MM/UM; a tier affinity), a sparse
  Dirichlet preference over categories tilted by lifestage, 10-30 *staples* (products they re-buy,
  with Dirichlet weights), a repeat propensity (share of basket slots filled from staples), a visit
  rate, a home store and a second store in the same region, mission propensities (Top Up / Small Shop
  / Full Shop) tilted by lifestage, a preferred weekday and daypart, and an active window: ~60 % exist
  from the first week, the others arrive uniformly over time, some leave. Late arrivals are the
  cold-start customers of the test weeks.
* Promotions: each week ~5 % of products are discounted by 15-40 %, which lowers their price and
  multiplies their choice weight by ``1 + PROMO_BOOST * discount``.

**Each week** (drawn from ``SeedSequence(seed, spawn_key=(1, week_index))``, so weeks are independent):

1. Traffic = ``baskets_per_week`` x (1 + 8 %/year trend) x (pre-Christmas peak). Every active
   customer makes Poisson(visit rate, rescaled to the carded traffic) trips; anonymous baskets are
   added so that they are ``anonymous_share`` of all baskets. Anonymous baskets use population
   preferences and have no staples.
2. Each basket gets a store (home store with the customer's home share, else the second store), a
   latent MISSION (sets the number of slots: Top Up 1-5, Small Shop 4-15, Full Shop 15 + NegBin, up
   to 75), a weekday (mission profile, or the customer's preferred day), an hour (mission x daypart x
   weekend profile, stores open ~7-22) and a latent FOCUS (Fresh / Grocery / Nonfood / Mixed, drawn
   given the mission) that reweights categories.
3. Each slot is a *repeat* with the customer's repeat propensity: a staple drawn by staple weight
   (dropped if the store does not carry it). Otherwise a category is drawn ~ preference x focus
   weight x seasonality, then a product in it ~ popularity x store assortment x promo boost x tier
   affinity of the customer's sensitivity. Each drawn product adds its partner with the complement
   probability (next line). Repeated products in a basket keep their first line.
4. Quantity is 1 (78 %) to 6; SPEND = QUANTITY x unit price, unit price = base price x format price
   factor (SS +5 %) x (1 - promo discount), both rounded to cents.
5. Labels follow from the realised basket (see :func:`basket_labels`), then ``xx_share`` of baskets
   get XX for the price sensitivity, type and dominant mission labels.

Rows are ordered by basket (baskets by day, hour, store), lines in line order. BASKET_ID is
``994100100000000 + week_index * 10**7 + running number`` (15 digits, unique over the dataset).

Idempotence: ``ground_truth/generator.json`` is written last and lists the config, a format version,
per-file rows, sizes and sha256. A second call with the same config reuses intact files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from retailsim_pipeline.config import GeneratorConfig
from retailsim_pipeline.prep.files import file_sha256
from retailsim_pipeline.prep.schema import (
    BASKET_TYPE_CODES,
    DOMINANT_MISSION_CODES,
    FIRST_WEEK,
    LGSR_COLUMNS,
    LIFESTAGE_CODES,
    PRICE_SENSITIVITY_CODES,
    STORE_FORMAT_CODES,
    WEEKS_PER_YEAR,
    week_code,
    week_monday,
    weekly_file_name,
)

logger = logging.getLogger(__name__)

#: Bumped whenever the generated bytes change for the same config: a stale manifest is not reused.
FORMAT_VERSION = 3
MANIFEST_NAME = "generator.json"
WORLD_NAME = "world.npz"

BASKET_ID_BASE = 994_100_100_000_000
BASKET_ID_WEEK_STRIDE = 10**7  # baskets per week must stay below this for unique 15-digit ids

# ---- latent code books (indices used throughout; the strings are what the sidecar shows) ----------
KINDS = ("Fresh", "Grocery", "Nonfood")  # a product's kind; also the first three dominant missions
TIERS = ("budget", "mid", "premium")
MISSIONS = ("Top Up", "Small Shop", "Full Shop")
FOCUSES = ("Fresh", "Grocery", "Nonfood", "Mixed")
DAYPARTS = ("morning", "midday", "evening")
REGION_POOL = ("E01", "E02", "E03", "W01", "W02", "N01", "N02", "N03", "S01", "S02", "S03", "W03")
#: Index of each LGSR store format in STORE_FORMAT_CODES order (LS, MS, SS, XLS).
FORMAT_SHARE_OF_PRODUCTS = np.array([0.90, 0.70, 0.45, 1.00])  # assortment breadth by format
FORMAT_TRAFFIC = np.array([2.0, 1.2, 0.8, 3.0])  # relative basket traffic by format
FORMAT_PRICE_FACTOR = np.array([1.00, 1.00, 1.05, 0.98])  # convenience stores charge a little more
N_SENS_GROUPS = 4  # LA, MM, UM, anonymous (neutral tier affinity)
MAX_STAPLES = 30
PROMO_BOOST = 4.0  # choice weight x (1 + 4 * discount): a 25 % discount doubles the weight
MAX_SLOTS = 75

# ---- label rule (documented for the ingest and evaluation code) -------------------------------
#: BASKET_SIZE: S <= 4 lines, M 5-14 lines, L >= 15 lines.
SIZE_SMALL_MAX_LINES = 4
SIZE_LARGE_MIN_LINES = 15
#: BASKET_TYPE: Full Shop if >= 15 lines or spend >= 50; Top Up if <= 5 lines and spend < 15;
#: else Small Shop.
FULL_SHOP_MIN_LINES = 15
FULL_SHOP_MIN_SPEND = 50.0
TOP_UP_MAX_LINES = 5
TOP_UP_MAX_SPEND = 15.0
#: BASKET_DOMINANT_MISSION: the kind with > 55 % of the basket's spend, else Mixed.
DOMINANT_SHARE = 0.55
#: BASKET_PRICE_SENSITIVITY: spend-weighted mean tier (0 budget, 1 mid, 2 premium):
#: < 0.8 → LA, > 1.2 → UM, else MM.
LA_MAX_TIER = 0.8
UM_MIN_TIER = 1.2


# ==============================================================================================
# World
# ==============================================================================================


@dataclass
class World:
    """Everything a week is drawn from. Shapes: P products, K categories (DEPs), S stores,
    C customers, W weeks. Index codes: kind/tier/mission/focus/daypart follow the tuples above;
    lifestage and sensitivity follow :mod:`schema` code order (XX last)."""

    # products [P], numbered in tree order (each hierarchy node owns a contiguous range)
    prod_cl: np.ndarray
    prod_dep: np.ndarray  # = category
    prod_g: np.ndarray
    prod_d: np.ndarray
    prod_kind: np.ndarray
    prod_tier: np.ndarray
    base_price: np.ndarray  # pounds
    popularity: np.ndarray  # sums to 1
    complement: np.ndarray  # partner product index
    complement_prob: np.ndarray
    region_only: np.ndarray  # region index the product is sold in, -1 everywhere
    # categories [K]
    cat_start: np.ndarray
    cat_stop: np.ndarray
    cat_kind: np.ndarray
    season_amp: np.ndarray
    season_phase: np.ndarray
    # stores [S]
    store_format: np.ndarray  # index into STORE_FORMAT_CODES
    store_region: np.ndarray  # index into region_codes
    region_codes: np.ndarray  # [R] str
    store_traffic: np.ndarray
    assortment: np.ndarray  # [S, P] bool
    # customers [C]
    cust_lifestage: np.ndarray  # true, 0..5
    cust_sensitivity: np.ndarray  # true, 0..2 (LA, MM, UM)
    cust_lifestage_recorded: np.ndarray  # 0..6, 6 = XX
    cust_sensitivity_recorded: np.ndarray  # 0..3, 3 = XX
    cust_pref: np.ndarray  # [C, K] float32, rows sum to 1
    staples: np.ndarray  # [C, MAX_STAPLES] int32, -1 padding
    staple_weight: np.ndarray  # [C, MAX_STAPLES] float32, rows sum to 1
    repeat_prop: np.ndarray
    visit_rate: np.ndarray  # relative; rescaled each week to the carded traffic
    start_week: np.ndarray  # first active week index
    end_week: np.ndarray  # first inactive week index (n_weeks = stays to the end)
    home_store: np.ndarray
    second_store: np.ndarray
    home_share: np.ndarray
    mission_prop: np.ndarray  # [C, 3]
    pref_day: np.ndarray  # 0 = Monday .. 6 = Sunday
    day_loyalty: np.ndarray  # probability of shopping on pref_day
    daypart: np.ndarray
    # population tables
    anon_pref: np.ndarray  # [K]
    anon_mission: np.ndarray  # [3]
    focus_weight: np.ndarray  # [4, K]
    focus_given_mission: np.ndarray  # [3, 4]
    day_given_mission: np.ndarray  # [3, 7]
    hour_table: np.ndarray  # [2 weekend, 3 daypart, 3 mission, 24]
    tier_affinity: np.ndarray  # [N_SENS_GROUPS, 3]
    quantity_probs: np.ndarray  # [6] for quantities 1..6
    promo_discount: np.ndarray  # [W, P] float32, 0 = not on promotion

    @property
    def n_products(self) -> int:
        return len(self.prod_cl)

    @property
    def n_categories(self) -> int:
        return len(self.cat_start)

    @property
    def n_stores(self) -> int:
        return len(self.store_format)

    @property
    def n_customers(self) -> int:
        return len(self.repeat_prop)

    def customer_sens_group(self, customer: np.ndarray) -> np.ndarray:
        """Tier-affinity group of each basket: the customer's true sensitivity, 3 for anonymous."""
        return np.where(customer >= 0, self.cust_sensitivity[np.maximum(customer, 0)], 3).astype(np.int64)


def _tree_parents(n_child: int, n_parent: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted parent index of each child; every parent gets at least one child (a proper tree)."""
    extra = rng.multinomial(n_child - n_parent, rng.dirichlet(np.full(n_parent, 3.0)))
    return np.repeat(np.arange(n_parent), 1 + extra).astype(np.int32)


def _categorical(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: ``probs`` [N, K] (or [K]) rows summing to 1, ``u`` [N] uniforms."""
    cdf = np.cumsum(probs, axis=-1)
    cdf = cdf / cdf[..., -1:]
    if cdf.ndim == 1:
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    return np.minimum((u[:, None] >= cdf).sum(axis=1), cdf.shape[1] - 1)


def sample_segments(cum: np.ndarray, start: np.ndarray, stop: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw one index in each ``[start, stop)`` with probability proportional to its weight.

    ``cum`` is the global cumulative sum of a flat weight array (many rows laid end to end), so one
    ``searchsorted`` samples from thousands of different distributions at once. Returns -1 where the
    segment has no mass (e.g. a store that carries nothing in the category).
    """
    lo = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    hi = cum[stop - 1]
    mass = hi - lo
    target = lo + u * mass
    # Binary search bounded to each segment: the same answer as np.searchsorted(cum, target, "right")
    # clipped to [start, stop), but each probe stays inside a short segment (cache-friendly), which
    # is ~5x faster than a global search over tens of millions of entries.
    left, right = start.astype(np.int64), (stop - 1).astype(np.int64)
    width = int((stop - start).max()) if len(start) else 1
    for _ in range(max(width, 1).bit_length()):
        mid = (left + right) >> 1
        go_right = cum[mid] <= target
        left = np.where(go_right, mid + 1, left)
        right = np.where(go_right, right, mid)
    idx = np.minimum(left, stop - 1)
    return np.where(mass > 1e-12 * np.maximum(hi, 1.0), idx, -1)


def _bump(center: float, width: float) -> np.ndarray:
    h = np.arange(24)
    return np.exp(-0.5 * ((h - center) / width) ** 2)


def _hour_table() -> np.ndarray:
    """P(hour | weekend, daypart, mission) [2, 3, 3, 24]: stores open ~7-22 with busy 8-21; full
    shops late morning at weekends and after work on weekdays, top-ups at lunch and after work."""
    open_hours = np.zeros(24)
    open_hours[8:22] = 1.0
    open_hours[7] = open_hours[22] = 0.15
    daypart_bump = [_bump(10, 1.5), _bump(13, 1.5), _bump(18, 1.5)]
    mission_bump = {
        (0, 0): _bump(12.5, 1.0) + _bump(17.5, 1.0),  # weekday top up: lunch, after work
        (0, 1): _bump(12, 2.0) + _bump(17, 1.5),
        (0, 2): _bump(18.5, 1.5) + 0.5 * _bump(10, 1.5),  # weekday full shop: evening
        (1, 0): _bump(11, 2.5) + 0.5 * _bump(16, 2.0),
        (1, 1): _bump(11.5, 2.0) + 0.5 * _bump(15, 2.0),
        (1, 2): _bump(11, 1.5) + 0.4 * _bump(15, 2.0),  # weekend full shop: late morning
    }
    table = np.zeros((2, 3, 3, 24))
    for weekend in (0, 1):
        for part in range(3):
            for mission in range(3):
                t = (0.08 + daypart_bump[part] + 1.5 * mission_bump[weekend, mission]) * open_hours
                table[weekend, part, mission] = t / t.sum()
    return table


def hierarchy_sizes(n_products: int) -> tuple[int, int, int, int]:
    """(D, G, DEP, CL) node counts for ``n_products``: ~4 D, 10-20 G, ~P/60 DEP, ~P/15 CL."""
    n_cl = min(n_products, max(round(n_products / 15), 30))
    n_dep = min(n_cl, max(round(n_products / 60), 15))
    n_g = min(n_dep, int(np.clip(round(n_products / 250), 10, 20)))
    n_d = min(n_g, 3 if n_products < 500 else 4 if n_products < 3000 else 5)
    return n_d, n_g, n_dep, n_cl


STAPLE_CHUNK = 50_000


def _draw_staples(
    rng: np.random.Generator,
    pref: np.ndarray,  # [c, K]
    sensitivity: np.ndarray,  # [c]
    home_assortment: np.ndarray,  # [c, P] bool
    n_staples: np.ndarray,  # [c]
    w0_cum: np.ndarray,  # cumsum of popularity x tier affinity, [3 * P]
    cat_start: np.ndarray,
    cat_stop: np.ndarray,
) -> np.ndarray:
    """Staples of c customers, [c, MAX_STAPLES] (-1 padded).

    2 * MAX_STAPLES candidates per customer: a category by preference, then a product by
    popularity x tier affinity (a [3, P] table, small enough to stay in cache). Candidates the home
    store does not carry and repeats are dropped; the first ``n_staples`` survivors are kept.
    """
    c, K = pref.shape
    P = home_assortment.shape[1]
    n_cand = 2 * MAX_STAPLES
    rows = np.repeat(np.arange(c), n_cand)
    pref_cum = np.cumsum(pref.astype(np.float64).ravel())
    cat = sample_segments(pref_cum, rows * K, rows * K + K, rng.random(c * n_cand)) - rows * K
    sens = sensitivity[rows].astype(np.int64)
    prod = sample_segments(w0_cum, sens * P + cat_start[cat], sens * P + cat_stop[cat], rng.random(len(rows)))
    prod = np.where(prod >= 0, prod - sens * P, -1)
    prod[~home_assortment[rows, np.maximum(prod, 0)]] = -1
    _, first = np.unique(rows.astype(np.int64) * (P + 1) + prod + 1, return_index=True)
    keep = np.zeros(len(prod), dtype=bool)
    keep[first] = True
    keep = (keep & (prod >= 0)).reshape(c, n_cand)
    keep &= np.cumsum(keep, axis=1) <= n_staples[:, None]
    cols = np.argsort(~keep, axis=1, kind="stable")[:, :MAX_STAPLES]  # kept candidates first, in order
    return np.where(
        np.take_along_axis(keep, cols, 1), np.take_along_axis(prod.reshape(c, n_cand), cols, 1), -1
    ).astype(np.int32)



def build_world(config: GeneratorConfig) -> World:
    """Draw the world (products, stores, customers, promotions) for ``config``; see the module doc."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    P, S, C, W = config.n_products, config.n_stores, config.n_customers, config.n_weeks

    # ---- products: a proper tree numbered in order, so each node is a contiguous range ----
    n_d, n_g, n_dep, n_cl = hierarchy_sizes(P)
    g_d = _tree_parents(n_g, n_d, rng)
    dep_g = _tree_parents(n_dep, n_g, rng)
    cl_dep = _tree_parents(n_cl, n_dep, rng)
    prod_cl = _tree_parents(P, n_cl, rng)
    prod_dep = cl_dep[prod_cl]
    prod_g = dep_g[prod_dep]
    prod_d = g_d[prod_g]
    d_kind = np.array([0, 1, 2, 1, 0][:n_d], dtype=np.int8)  # Fresh, Grocery, Nonfood, Grocery, Fresh
    prod_kind = d_kind[prod_d]
    cat_kind = d_kind[g_d[dep_g]]
    bounds = np.searchsorted(prod_dep, np.arange(n_dep + 1))
    cat_start, cat_stop = bounds[:-1], bounds[1:]

    prod_tier = rng.choice(3, size=P, p=[0.3, 0.45, 0.25]).astype(np.int8)
    kind_median = np.array([1.8, 1.5, 3.5])
    tier_factor = np.array([0.7, 1.0, 1.6])
    base_price = kind_median[prod_kind] * tier_factor[prod_tier] * rng.lognormal(0.0, 0.45, size=P)
    base_price = np.maximum(np.round(base_price, 2), 0.10)
    rank = rng.permutation(P)
    popularity = 1.0 / (rank + 5.0) ** 0.8
    popularity /= popularity.sum()

    # partner in another category of the same G (else same D, else anywhere): bread → butter.
    # Nodes are contiguous ranges, so "a random product of my node" is start + u * size.
    complement = np.full(P, -1, dtype=np.int64)
    for level in (prod_g, prod_d, np.zeros(P, dtype=np.int64)):
        node_bounds = np.searchsorted(level, np.arange(level.max() + 2))
        start, size = node_bounds[level], node_bounds[level + 1] - node_bounds[level]
        for _ in range(8):  # a few tries per level; the rare leftovers fall through to the next level
            cand = start + (rng.random(P) * size).astype(np.int64)
            hit = (complement < 0) & (prod_dep[cand] != prod_dep)
            complement[hit] = cand[hit]
    complement = np.where(complement < 0, (np.arange(P) + 1) % P, complement).astype(np.int32)
    complement_prob = np.where(rng.random(P) < 0.5, rng.uniform(0.15, 0.5, P), rng.uniform(0.0, 0.08, P))

    season_amp = np.where(rng.random(n_dep) < 0.3, rng.uniform(0.3, 0.9, n_dep), rng.uniform(0.0, 0.15, n_dep))
    season_phase = rng.uniform(0, 2 * np.pi, n_dep)

    # ---- stores ----
    store_format = rng.choice(4, size=S, p=[0.3, 0.25, 0.3, 0.15]).astype(np.int8)
    must = np.array([3, 0, 1, 2], dtype=np.int8)[: min(S, 4)]  # every format present when S >= 4
    store_format[rng.permutation(S)[: len(must)]] = must
    n_regions = int(np.clip(S // 3, 2, 10)) if S > 1 else 1
    region_codes = np.array(sorted(rng.choice(REGION_POOL, size=n_regions, replace=False)))
    # every region has a store; the rest are spread at random
    store_region = rng.permutation(
        np.concatenate([np.arange(n_regions), rng.integers(0, n_regions, S - n_regions)])
    ).astype(np.int16)
    store_traffic = FORMAT_TRAFFIC[store_format] * rng.lognormal(0, 0.3, S)
    # assortment: a store carries products whose popularity-rank-with-noise is within its breadth
    noisy_rank = (rank + rng.normal(0, 0.15 * P, size=(S, P))) / P
    assortment = noisy_rank < FORMAT_SHARE_OF_PRODUCTS[store_format][:, None]
    assortment[store_format == 3] = True
    region_only = np.where(rng.random(P) < 0.03, rng.integers(0, n_regions, P), -1).astype(np.int16)
    regional = region_only >= 0
    assortment[:, regional] &= store_region[:, None] == region_only[None, regional]

    # ---- customers ----
    cust_lifestage = rng.choice(6, size=C, p=[0.14, 0.16, 0.17, 0.18, 0.20, 0.15]).astype(np.int8)
    cust_sensitivity = rng.choice(3, size=C, p=[0.3, 0.45, 0.25]).astype(np.int8)
    xx = max(config.xx_share, 0.0)
    cust_lifestage_recorded = np.where(rng.random(C) < xx, 6, cust_lifestage).astype(np.int8)
    cust_sensitivity_recorded = np.where(rng.random(C) < xx, 3, cust_sensitivity).astype(np.int8)

    cat_pop = np.bincount(prod_dep, weights=popularity, minlength=n_dep)
    lifestage_tilt = rng.lognormal(0, 0.7, size=(6, n_dep))
    alpha = 0.35 * n_dep * (0.5 * cat_pop + 0.5 / n_dep) * lifestage_tilt[cust_lifestage]  # [C, K]
    cust_pref = rng.gamma(alpha)  # sparse Dirichlet: a few categories dominate each customer
    del alpha  # [C, K] float64 is ~330 MB at full scale; keep the peak low
    cust_pref += 1e-6
    cust_pref /= cust_pref.sum(1, keepdims=True)
    cust_pref = cust_pref.astype(np.float32)
    anon_pref = cat_pop * lifestage_tilt.mean(0)
    anon_pref /= anon_pref.sum()

    ls_mission = np.array([[3, 2, 0.6], [2, 2, 1], [1.5, 2, 1.8], [1.5, 2, 2], [2, 2.5, 1], [2, 2, 1.2]])
    mission_prop = rng.gamma(3.0 * ls_mission[cust_lifestage])
    mission_prop = (mission_prop / mission_prop.sum(1, keepdims=True)).astype(np.float32)
    anon_mission = np.array([0.55, 0.32, 0.13])

    tier_affinity = np.array([[2.5, 1.0, 0.3], [1.0, 1.4, 0.8], [0.35, 1.0, 2.5], [1.0, 1.0, 1.0]])

    home_store = _categorical(store_traffic / store_traffic.sum(), rng.random(C)).astype(np.int32)
    by_region = np.argsort(store_region, kind="stable")
    region_first = np.searchsorted(store_region[by_region], np.arange(n_regions))
    region_count = np.bincount(store_region, minlength=n_regions)
    r = store_region[home_store]
    second_store = by_region[region_first[r] + (rng.random(C) * region_count[r]).astype(np.int64)].astype(np.int32)
    home_share = rng.beta(8, 1.5, C).astype(np.float32)

    n_staples = rng.integers(10, MAX_STAPLES + 1, C)
    staples = np.full((C, MAX_STAPLES), -1, dtype=np.int32)
    w0_cum = np.cumsum((popularity * tier_affinity[:3, prod_tier]).ravel())
    for lo in range(0, C, STAPLE_CHUNK):  # chunks of customers bound the temporaries (~30M draws at full)
        hi = min(C, lo + STAPLE_CHUNK)
        staples[lo:hi] = _draw_staples(
            rng, cust_pref[lo:hi], cust_sensitivity[lo:hi], assortment[home_store[lo:hi]], n_staples[lo:hi],
            w0_cum, cat_start, cat_stop,
        )
    staple_weight = rng.gamma(0.8, size=(C, MAX_STAPLES)) * (staples >= 0)
    total = staple_weight.sum(1, keepdims=True)
    staple_weight = np.where(total > 0, staple_weight / np.where(total > 0, total, 1), 0).astype(np.float32)
    repeat_prop = rng.beta(5, 4, C).astype(np.float32)

    visit_rate = rng.gamma(1.5, 1.0, C).astype(np.float32)
    arriving = rng.random(C) < config.arriving_customer_share
    start_week = np.where(arriving & (W > 1), rng.integers(1, max(W, 2), C), 0).astype(np.int32)
    leaving = rng.random(C) < config.leaving_customer_share
    end_week = np.where(leaving, start_week + 1 + (rng.random(C) * (W - start_week)).astype(np.int64), W)
    end_week = np.minimum(end_week, W).astype(np.int32)

    day_given_mission = np.array(
        [
            [0.15, 0.15, 0.15, 0.15, 0.16, 0.13, 0.11],  # Top Up: any day
            [0.13, 0.13, 0.14, 0.14, 0.16, 0.17, 0.13],
            [0.08, 0.08, 0.09, 0.12, 0.18, 0.27, 0.18],  # Full Shop: Friday to Sunday
        ]
    )
    pref_day = _categorical(day_given_mission.mean(0), rng.random(C)).astype(np.int8)
    day_loyalty = rng.beta(2, 3, C).astype(np.float32)
    daypart = rng.choice(3, size=C, p=[0.3, 0.3, 0.4]).astype(np.int8)

    # focus reweights categories: a Fresh-focused basket draws Fresh categories ~6x more often
    focus_weight = np.ones((4, n_dep))
    for f in range(3):
        focus_weight[f] = np.where(cat_kind == f, 6.0, 0.35)
    focus_given_mission = np.array([[0.45, 0.2, 0.1, 0.25], [0.3, 0.3, 0.1, 0.3], [0.12, 0.15, 0.05, 0.68]])

    promo_discount = np.where(
        rng.random((W, P)) < config.promo_share, rng.uniform(0.15, 0.40, (W, P)), 0.0
    ).astype(np.float32)

    return World(
        prod_cl=prod_cl, prod_dep=prod_dep.astype(np.int32), prod_g=prod_g.astype(np.int32),
        prod_d=prod_d.astype(np.int32), prod_kind=prod_kind, prod_tier=prod_tier, base_price=base_price,
        popularity=popularity, complement=complement, complement_prob=complement_prob.astype(np.float32),
        region_only=region_only, cat_start=cat_start, cat_stop=cat_stop, cat_kind=cat_kind,
        season_amp=season_amp, season_phase=season_phase, store_format=store_format,
        store_region=store_region, region_codes=region_codes, store_traffic=store_traffic,
        assortment=assortment, cust_lifestage=cust_lifestage, cust_sensitivity=cust_sensitivity,
        cust_lifestage_recorded=cust_lifestage_recorded, cust_sensitivity_recorded=cust_sensitivity_recorded,
        cust_pref=cust_pref, staples=staples, staple_weight=staple_weight, repeat_prop=repeat_prop,
        visit_rate=visit_rate, start_week=start_week, end_week=end_week, home_store=home_store,
        second_store=second_store, home_share=home_share, mission_prop=mission_prop, pref_day=pref_day,
        day_loyalty=day_loyalty, daypart=daypart, anon_pref=anon_pref, anon_mission=anon_mission,
        focus_weight=focus_weight, focus_given_mission=focus_given_mission,
        day_given_mission=day_given_mission, hour_table=_hour_table(), tier_affinity=tier_affinity,
        quantity_probs=np.array([0.78, 0.12, 0.05, 0.025, 0.015, 0.01]), promo_discount=promo_discount,
    )


# ==============================================================================================
# The generator's own probabilities (shared with the oracle in ground_truth.py)
# ==============================================================================================


def week_of_year(week: np.ndarray | int) -> np.ndarray:
    """Fiscal week number 0..51 of week index ``week`` (week 0 = 200607 → 6)."""
    return (FIRST_WEEK % 100 - 1 + np.asarray(week)) % WEEKS_PER_YEAR


def category_probs(world: World, customer: np.ndarray, focus: np.ndarray, week: np.ndarray) -> np.ndarray:
    """P(category | basket) for a non-repeat slot, [B, K]: preference x focus weight x season."""
    pref = world.cust_pref[np.maximum(customer, 0)].astype(np.float64)
    pref[customer < 0] = world.anon_pref
    angle = 2 * np.pi * week_of_year(week)[:, None] / WEEKS_PER_YEAR + world.season_phase[None, :]
    p = pref * world.focus_weight[focus] * np.exp(world.season_amp[None, :] * np.sin(angle))
    return p / p.sum(axis=1, keepdims=True)


def product_choice_weights(world: World, week: int) -> np.ndarray:
    """Unnormalised P(product | category, store, sensitivity group) in ``week``, [S * 4, P]
    (row = store * 4 + group): popularity x assortment x promo boost x tier affinity."""
    base = world.popularity * (1.0 + PROMO_BOOST * world.promo_discount[week])
    w = world.assortment[:, None, :] * (world.tier_affinity[:, world.prod_tier] * base)[None, :, :]
    return w.reshape(world.n_stores * N_SENS_GROUPS, world.n_products)


def traffic_multiplier(week: int) -> float:
    """Basket traffic of week index ``week`` relative to ``baskets_per_week``: +8 %/year trend,
    +20 % in the two weeks before Christmas (fiscal weeks 42-43), -10 % in the week after."""
    wy = int(week_of_year(week)) + 1
    season = {42: 1.2, 43: 1.25, 44: 0.9}.get(wy, 1.0)
    return (1.0 + 0.08 * week / WEEKS_PER_YEAR) * season


# ==============================================================================================
# One week
# ==============================================================================================


@dataclass
class WeekDraw:
    """One simulated week. Baskets [B] (latent context), lines [N] (in file order)."""

    week: int
    basket_customer: np.ndarray
    basket_store: np.ndarray
    basket_day: np.ndarray  # 0 = Monday
    basket_hour: np.ndarray
    basket_mission: np.ndarray
    basket_focus: np.ndarray
    basket_slots: np.ndarray
    basket_id: np.ndarray
    line_basket: np.ndarray  # basket index of each line
    line_product: np.ndarray
    line_quantity: np.ndarray
    line_spend: np.ndarray
    labels: dict[str, np.ndarray]  # label column → code index into the schema code tuple


class _Samplers:
    """Per-run precomputations reused by every week (flat cumulative weights)."""

    def __init__(self, world: World):
        self.staple_cum = np.cumsum(world.staple_weight.astype(np.float64).ravel())
        self.store_p = world.store_traffic / world.store_traffic.sum()


def simulate_week(world: World, config: GeneratorConfig, week: int, samplers: _Samplers | None = None) -> WeekDraw:
    """Draw the baskets and lines of week index ``week`` (independent of every other week)."""
    sm = samplers or _Samplers(world)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, week)))
    P, C = world.n_products, world.n_customers

    # ---- trips ----
    target = config.baskets_per_week * traffic_multiplier(week)
    anon = config.anonymous_share
    active = (world.start_week <= week) & (week < world.end_week)
    lam = world.visit_rate.astype(np.float64) * active
    if anon < 1.0 and lam.sum() > 0:
        lam *= target * (1.0 - anon) / lam.sum()
        customers = np.repeat(np.arange(C, dtype=np.int64), rng.poisson(lam))
    else:
        customers = np.zeros(0, dtype=np.int64)
    n_carded = len(customers)
    n_anon = round(n_carded * anon / (1.0 - anon)) if anon < 1.0 else round(target)
    cust = np.concatenate([customers, np.full(n_anon, -1, dtype=np.int64)])
    B = len(cust)
    if B >= BASKET_ID_WEEK_STRIDE:
        raise ValueError(f"{B} baskets in week {week}: more than {BASKET_ID_WEEK_STRIDE} breaks BASKET_ID")
    carded = cust >= 0
    c0 = np.maximum(cust, 0)

    # ---- basket context ----
    mission = np.where(
        carded, _categorical(world.mission_prop[c0], rng.random(B)), _categorical(world.anon_mission, rng.random(B))
    )
    store = np.where(
        rng.random(B) < world.home_share[c0], world.home_store[c0], world.second_store[c0]
    ).astype(np.int64)
    store[~carded] = _categorical(sm.store_p, rng.random(int((~carded).sum())))
    day = _categorical(world.day_given_mission[mission], rng.random(B))
    loyal = carded & (rng.random(B) < world.day_loyalty[c0])
    day = np.where(loyal, world.pref_day[c0], day)
    part = np.where(carded, world.daypart[c0], rng.integers(0, 3, B)).astype(np.int64)
    group = ((day >= 5) * 9 + part * 3 + mission).astype(np.int64)  # rows of hour_table flattened
    hour_cum = np.cumsum(world.hour_table.ravel())
    hour = sample_segments(hour_cum, group * 24, group * 24 + 24, rng.random(B)) - group * 24
    focus = _categorical(world.focus_given_mission[mission], rng.random(B))
    slots = np.select(
        [mission == 0, mission == 1],
        [np.minimum(rng.geometric(0.4, B), 5), rng.integers(4, 18, B)],
        np.minimum(15 + rng.negative_binomial(2, 2 / 17, B), MAX_SLOTS),
    ).astype(np.int64)

    # file order: by day, hour, store, then arrival; ids follow that order
    order = np.lexsort((rng.random(B), store, hour, day))
    cust, carded, c0, mission, store, day, hour, focus, slots = (
        a[order] for a in (cust, carded, c0, mission, store, day, hour, focus, slots)
    )
    sens_group = world.customer_sens_group(cust)

    # ---- slots ----
    T = int(slots.sum())
    slot_b = np.repeat(np.arange(B), slots)
    slot_c = cust[slot_b]
    is_rep = (slot_c >= 0) & (rng.random(T) < world.repeat_prop[np.maximum(slot_c, 0)])
    prod = np.full(T, -1, dtype=np.int64)
    rc = slot_c[is_rep]
    j = sample_segments(sm.staple_cum, rc * MAX_STAPLES, rc * MAX_STAPLES + MAX_STAPLES, rng.random(len(rc)))
    prod[is_rep] = np.where(j >= 0, world.staples.ravel()[np.maximum(j, 0)], -1)

    new = ~is_rep
    nb = slot_b[new]
    cat_p = category_probs(world, cust, focus, np.full(B, week))  # [B, K]
    K = world.n_categories
    cat = sample_segments(np.cumsum(cat_p.ravel()), nb * K, nb * K + K, rng.random(len(nb))) - nb * K
    w_cum = np.cumsum(product_choice_weights(world, week).ravel())
    g = store[nb] * N_SENS_GROUPS + sens_group[nb]
    pick = sample_segments(w_cum, g * P + world.cat_start[cat], g * P + world.cat_stop[cat], rng.random(len(nb)))
    prod[new] = np.where(pick >= 0, pick - g * P, -1)
    # a staple the store does not carry is simply not bought this trip
    ok = prod >= 0
    ok[ok] = world.assortment[store[slot_b[ok]], prod[ok]]
    slot_b, prod, key = slot_b[ok], prod[ok], np.flatnonzero(ok) * 2

    # ---- complements: the partner goes on the next line ----
    partner = world.complement[prod]
    add = (rng.random(len(prod)) < world.complement_prob[prod]) & world.assortment[store[slot_b], partner]
    line_b = np.concatenate([slot_b, slot_b[add]])
    line_p = np.concatenate([prod, partner[add]])
    line_key = np.concatenate([key, key[add] + 1])
    o = np.argsort(line_key)
    line_b, line_p = line_b[o], line_p[o]
    # repeated products keep their first line
    _, first = np.unique(line_b * P + line_p, return_index=True)
    first.sort()
    line_b, line_p = line_b[first], line_p[first]

    # drop baskets that ended up empty, renumber the rest
    n_lines = np.bincount(line_b, minlength=B)
    nonempty = n_lines > 0
    new_index = np.cumsum(nonempty) - 1
    line_b = new_index[line_b]
    cust, mission, store, day, hour, focus, slots, sens_group = (
        a[nonempty] for a in (cust, mission, store, day, hour, focus, slots, sens_group)
    )
    B = len(cust)
    N = len(line_b)

    # ---- quantities and prices ----
    qty = 1 + _categorical(world.quantity_probs, rng.random(N))
    unit = world.base_price[line_p] * FORMAT_PRICE_FACTOR[world.store_format[store[line_b]]]
    unit = np.maximum(np.round(unit * (1.0 - world.promo_discount[week, line_p]), 2), 0.01)
    spend = np.round(qty * unit, 2)

    labels = basket_labels(world, line_b, line_p, spend, B)
    xx = rng.random(B) < config.xx_share
    labels["BASKET_PRICE_SENSITIVITY"][xx] = PRICE_SENSITIVITY_CODES.index("XX")
    labels["BASKET_TYPE"][xx] = BASKET_TYPE_CODES.index("XX")
    labels["BASKET_DOMINANT_MISSION"][xx] = DOMINANT_MISSION_CODES.index("XX")

    return WeekDraw(
        week=week, basket_customer=cust, basket_store=store, basket_day=day, basket_hour=hour,
        basket_mission=mission, basket_focus=focus, basket_slots=slots,
        basket_id=BASKET_ID_BASE + week * BASKET_ID_WEEK_STRIDE + np.arange(B, dtype=np.int64),
        line_basket=line_b, line_product=line_p, line_quantity=qty, line_spend=spend, labels=labels,
    )


def basket_labels(
    world: World, line_basket: np.ndarray, line_product: np.ndarray, spend: np.ndarray, n_baskets: int
) -> dict[str, np.ndarray]:
    """The four labels from the realised basket (before XX), as indices into the schema code sets.

    BASKET_SIZE: S <= 4 lines, M 5-14, L >= 15. BASKET_TYPE: Full Shop if >= 15 lines or spend >= 50,
    Top Up if <= 5 lines and spend < 15, else Small Shop. BASKET_DOMINANT_MISSION: the kind (Fresh,
    Grocery, Nonfood) with > 55 % of spend, else Mixed. BASKET_PRICE_SENSITIVITY: spend-weighted mean
    tier (budget 0, mid 1, premium 2) < 0.8 → LA, > 1.2 → UM, else MM.
    """
    n = np.bincount(line_basket, minlength=n_baskets)
    total = np.bincount(line_basket, weights=spend, minlength=n_baskets)
    safe = np.where(total > 0, total, 1.0)
    size = np.where(n <= SIZE_SMALL_MAX_LINES, 0, np.where(n >= SIZE_LARGE_MIN_LINES, 2, 1))
    btype = np.where(
        (n >= FULL_SHOP_MIN_LINES) | (total >= FULL_SHOP_MIN_SPEND),
        BASKET_TYPE_CODES.index("Full Shop"),
        np.where(
            (n <= TOP_UP_MAX_LINES) & (total < TOP_UP_MAX_SPEND),
            BASKET_TYPE_CODES.index("Top Up"),
            BASKET_TYPE_CODES.index("Small Shop"),
        ),
    )
    kind_spend = np.bincount(
        line_basket * 3 + world.prod_kind[line_product], weights=spend, minlength=n_baskets * 3
    ).reshape(n_baskets, 3) / safe[:, None]
    top = kind_spend.argmax(1)
    kind_code = np.array([DOMINANT_MISSION_CODES.index(k) for k in KINDS])
    dominant = np.where(
        kind_spend.max(1) > DOMINANT_SHARE, kind_code[top], DOMINANT_MISSION_CODES.index("Mixed")
    )
    tier = np.bincount(line_basket, weights=spend * world.prod_tier[line_product], minlength=n_baskets) / safe
    sens = np.where(tier < LA_MAX_TIER, 0, np.where(tier > UM_MIN_TIER, 2, 1))
    return {
        "BASKET_SIZE": size.astype(np.int8),
        "BASKET_PRICE_SENSITIVITY": sens.astype(np.int8),
        "BASKET_TYPE": btype.astype(np.int8),
        "BASKET_DOMINANT_MISSION": dominant.astype(np.int8),
    }


# ==============================================================================================
# Writing
# ==============================================================================================


class _Codebook:
    """String columns as polars Series gathered by index (a trailing null serves index -1)."""

    def __init__(self, world: World):
        P, S, C = world.n_products, world.n_stores, world.n_customers
        prod_num = np.arange(P)

        def codes(prefix: str, numbers: np.ndarray, width: int) -> pl.Series:
            return pl.Series([f"{prefix}{n:0{width}d}" for n in numbers.tolist()], dtype=pl.String)

        self.product = {
            "PROD_CODE": codes("PRD", 900_001 + prod_num, 7),
            "PROD_CODE_10": codes("CL", 1 + world.prod_cl, 5),
            "PROD_CODE_20": codes("DEP", 1 + world.prod_dep, 5),
            "PROD_CODE_30": codes("G", 1 + world.prod_g, 5),
            "PROD_CODE_40": codes("D", 1 + world.prod_d, 5),
        }
        with_null = lambda s: s.extend(pl.Series([None], dtype=pl.String))  # noqa: E731
        self.customer = with_null(codes("CUST", 1 + np.arange(C), 10))
        sens = np.array(PRICE_SENSITIVITY_CODES)[world.cust_sensitivity_recorded].tolist()
        life = np.array(LIFESTAGE_CODES)[world.cust_lifestage_recorded].tolist()
        self.customer_sens = pl.Series(sens + [None], dtype=pl.String)
        self.customer_life = pl.Series(life + [None], dtype=pl.String)
        self.store = codes("STORE", 1 + np.arange(S), 5)
        self.store_format = pl.Series(np.array(STORE_FORMAT_CODES)[world.store_format].tolist(), dtype=pl.String)
        self.store_region = pl.Series(world.region_codes[world.store_region].tolist(), dtype=pl.String)
        self.n_customers = C


def product_code(index: np.ndarray) -> list[str]:
    return [f"PRD{900_001 + i:07d}" for i in np.asarray(index).tolist()]


def customer_code(index: np.ndarray) -> list[str | None]:
    return [f"CUST{1 + i:010d}" if i >= 0 else None for i in np.asarray(index).tolist()]


def store_code(index: np.ndarray) -> list[str]:
    return [f"STORE{1 + i:05d}" for i in np.asarray(index).tolist()]


def week_frame(world: World, draw: WeekDraw, codebook: _Codebook) -> pl.DataFrame:
    """The week's rows in LGSR column order."""
    lb, lp = draw.line_basket, draw.line_product
    code = week_code(draw.week)
    monday = week_monday(code)
    dates = np.array([int((monday + dt.timedelta(days=d)).strftime("%Y%m%d")) for d in range(7)], dtype=np.int32)
    lgsr_weekday = np.array([2, 3, 4, 5, 6, 7, 1], dtype=np.int8)  # Monday..Sunday, 1 = Sunday
    day = draw.basket_day[lb]
    cust = draw.basket_customer[lb]
    cust_idx = pl.Series(np.where(cust >= 0, cust, codebook.n_customers))
    store = pl.Series(draw.basket_store[lb])
    prod = pl.Series(lp)
    label = {c: np.array(codes)[draw.labels[c][lb]] for c, codes in (
        ("BASKET_SIZE", ("S", "M", "L")),
        ("BASKET_PRICE_SENSITIVITY", PRICE_SENSITIVITY_CODES),
        ("BASKET_TYPE", BASKET_TYPE_CODES),
        ("BASKET_DOMINANT_MISSION", DOMINANT_MISSION_CODES),
    )}
    cols = {
        "SHOP_WEEK": pl.Series(np.full(len(lb), code, dtype=np.int32)),
        "SHOP_DATE": pl.Series(dates[day]),
        "SHOP_WEEKDAY": pl.Series(lgsr_weekday[day]),
        "SHOP_HOUR": pl.Series(draw.basket_hour[lb].astype(np.int8)),
        "QUANTITY": pl.Series(draw.line_quantity.astype(np.int32)),
        "SPEND": pl.Series(draw.line_spend),
        **{name: s.gather(prod) for name, s in codebook.product.items()},
        "CUST_CODE": codebook.customer.gather(cust_idx),
        "CUST_PRICE_SENSITIVITY": codebook.customer_sens.gather(cust_idx),
        "CUST_LIFESTAGE": codebook.customer_life.gather(cust_idx),
        "BASKET_ID": pl.Series(draw.basket_id[lb]),
        "BASKET_SIZE": pl.Series(label["BASKET_SIZE"], dtype=pl.String),
        "BASKET_PRICE_SENSITIVITY": pl.Series(label["BASKET_PRICE_SENSITIVITY"], dtype=pl.String),
        "BASKET_TYPE": pl.Series(label["BASKET_TYPE"], dtype=pl.String),
        "BASKET_DOMINANT_MISSION": pl.Series(label["BASKET_DOMINANT_MISSION"], dtype=pl.String),
        "STORE_CODE": codebook.store.gather(store),
        "STORE_FORMAT": codebook.store_format.gather(store),
        "STORE_REGION": codebook.store_region.gather(store),
    }
    return pl.DataFrame({name: cols[name].alias(name) for name in LGSR_COLUMNS})


def basket_truth_frame(draw: WeekDraw) -> pl.DataFrame:
    """Latent context of each basket of the week (ground truth, never a feature)."""
    return pl.DataFrame(
        {
            "BASKET_ID": draw.basket_id,
            "SHOP_WEEK": np.full(len(draw.basket_id), week_code(draw.week), dtype=np.int32),
            "week_index": np.full(len(draw.basket_id), draw.week, dtype=np.int32),
            "customer_index": draw.basket_customer.astype(np.int32),
            "store_index": draw.basket_store.astype(np.int32),
            "mission": draw.basket_mission.astype(np.int8),
            "focus": draw.basket_focus.astype(np.int8),
            "n_slots": draw.basket_slots.astype(np.int16),
            "n_lines": np.bincount(draw.line_basket, minlength=len(draw.basket_id)).astype(np.int16),
        }
    )


def _atomic(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` to a hidden temporary name beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_world(world: World, ground_truth_dir: Path) -> list[Path]:
    """Write the world: ``world.npz`` (every array, for :func:`ground_truth.load_world`) and
    readable parquet tables of products, stores, customers and promotions."""
    gt = Path(ground_truth_dir)
    arrays = dataclasses.asdict(world)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic(gt / WORLD_NAME, write_npz)
    P = world.n_products
    products = pl.DataFrame(
        {
            "PROD_CODE": product_code(np.arange(P)),
            "PROD_CODE_10": [f"CL{1 + i:05d}" for i in world.prod_cl.tolist()],
            "PROD_CODE_20": [f"DEP{1 + i:05d}" for i in world.prod_dep.tolist()],
            "PROD_CODE_30": [f"G{1 + i:05d}" for i in world.prod_g.tolist()],
            "PROD_CODE_40": [f"D{1 + i:05d}" for i in world.prod_d.tolist()],
            "kind": np.array(KINDS)[world.prod_kind],
            "tier": np.array(TIERS)[world.prod_tier],
            "base_price": world.base_price,
            "popularity": world.popularity,
            "complement": product_code(world.complement),
            "complement_prob": world.complement_prob,
            "region_only": [world.region_codes[r] if r >= 0 else None for r in world.region_only.tolist()],
            "stores_carrying": world.assortment.sum(0).astype(np.int32),
        }
    )
    stores = pl.DataFrame(
        {
            "STORE_CODE": store_code(np.arange(world.n_stores)),
            "STORE_FORMAT": np.array(STORE_FORMAT_CODES)[world.store_format],
            "STORE_REGION": world.region_codes[world.store_region],
            "traffic_weight": world.store_traffic,
            "products_carried": world.assortment.sum(1).astype(np.int32),
        }
    )
    C, K = world.n_customers, MAX_STAPLES
    padded_codes = pl.Series(product_code(np.arange(P)) + [None], dtype=pl.String)
    staple_idx = pl.Series(np.where(world.staples >= 0, world.staples, P).ravel())
    staple_w = np.where(world.staples >= 0, world.staple_weight, np.nan).ravel()

    def rows_of(flat: pl.Series, width: int) -> pl.Series:
        """[C * width] flat → list column of C rows, padding (null) dropped."""
        return flat.reshape((C, width)).arr.to_list().list.drop_nulls()

    customers = pl.DataFrame(
        {
            "CUST_CODE": customer_code(np.arange(C)),
            "lifestage": np.array(LIFESTAGE_CODES)[world.cust_lifestage],
            "price_sensitivity": np.array(PRICE_SENSITIVITY_CODES)[world.cust_sensitivity],
            "recorded_lifestage": np.array(LIFESTAGE_CODES)[world.cust_lifestage_recorded],
            "recorded_price_sensitivity": np.array(PRICE_SENSITIVITY_CODES)[world.cust_sensitivity_recorded],
            "category_preference": rows_of(pl.Series(world.cust_pref.ravel()), world.n_categories),
            "staples": rows_of(padded_codes.gather(staple_idx), K),
            "staple_weights": rows_of(pl.Series(staple_w, nan_to_null=True), K),
            "repeat_propensity": world.repeat_prop,
            "visit_rate": world.visit_rate,
            "start_week": world.start_week,
            "end_week": world.end_week,
            "home_store": store_code(world.home_store),
            "second_store": store_code(world.second_store),
            "home_share": world.home_share,
            "mission_propensity": rows_of(pl.Series(world.mission_prop.ravel()), 3),
            "preferred_weekday": world.pref_day,
            "day_loyalty": world.day_loyalty,
            "daypart": np.array(DAYPARTS)[world.daypart],
        }
    )
    wk, pr = np.nonzero(world.promo_discount)
    promotions = pl.DataFrame(
        {
            "SHOP_WEEK": np.array([week_code(w) for w in range(world.promo_discount.shape[0])], dtype=np.int32)[wk],
            "PROD_CODE": product_code(pr),
            "discount": world.promo_discount[wk, pr],
        }
    )
    paths = [gt / WORLD_NAME]
    for name, frame in (("products", products), ("stores", stores), ("customers", customers),
                        ("promotions", promotions)):
        path = gt / f"{name}.parquet"
        _atomic(path, frame.write_parquet)
        paths.append(path)
    return paths


# ==============================================================================================
# Entry point
# ==============================================================================================


@dataclass(frozen=True)
class GenerationSummary:
    """What :func:`generate` produced (or found): totals over all weeks and the weekly CSV paths."""

    rows: int
    baskets: int
    customers: int  # distinct loyalty customers with at least one basket
    weeks: int
    files: list[Path]
    seconds: float
    reused: bool


def _manifest_payload(config: GeneratorConfig) -> dict:
    return {"format_version": FORMAT_VERSION, "config": config.model_dump(mode="json")}


def _write_gzip(path: Path, text: bytes) -> None:
    """``text`` gzip-compressed (level 1: the CSV shrinks ~4x at ~100 MB/s; ``mtime=0``, so the same week
    gives the same bytes) to ``path``, atomically."""
    _atomic(path, lambda tmp: tmp.write_bytes(gzip.compress(text, compresslevel=1, mtime=0)))


def _record(files_info: dict, out_dir: Path, path: Path, rows: int, written: Future | None) -> None:
    """The manifest entry of a written file (after its background write, if any, finished)."""
    if written is not None:
        written.result()
    files_info[str(path.relative_to(out_dir))] = {"rows": rows, "bytes": path.stat().st_size,
                                                  "sha256": file_sha256(path)}


def _reusable(out_dir: Path, config: GeneratorConfig, compress: bool = False) -> dict | None:
    """The manifest if it matches ``config`` and every listed file is intact, else None."""
    path = out_dir / "ground_truth" / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    expected = _manifest_payload(config)
    if any(manifest.get(k) != v for k, v in expected.items()) or manifest.get("compressed", False) != compress:
        return None
    for rel, info in manifest.get("files", {}).items():
        f = out_dir / rel
        if not f.exists() or f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
            logger.info("generated data in %s changed (%s); regenerating", out_dir, rel)
            return None
    return manifest


def generate(config: GeneratorConfig, out_dir: Path, *, progress: bool = False,
             compress: bool = False) -> GenerationSummary:
    """Generate ``config.n_weeks`` weekly LGSR files under ``out_dir/raw`` and the ground truth
    under ``out_dir/ground_truth``; reuse them when ``generator.json`` says they are this config's
    and they are intact. Streams one week at a time; see the module docstring for the model.

    ``compress``: write ``transactions_YYYYWW.csv.gz`` (gzip level 1, as the published LGSR weeks come)
    instead of ``.csv``: a quarter of the disk (the ``full`` preset's 117 weeks: ~48 GB of CSV). The
    compression of a week runs in a background thread while the next week is drawn. The rows are the
    same either way."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    raw, gt = out_dir / "raw", out_dir / "ground_truth"
    manifest = _reusable(out_dir, config, compress)
    if manifest is not None:
        files = [out_dir / rel for rel in manifest["weekly_files"]]
        logger.info("reusing %d generated weekly files in %s (config matches, hashes intact)", len(files), raw)
        t = manifest["totals"]
        return GenerationSummary(
            rows=t["rows"], baskets=t["baskets"], customers=t["customers"], weeks=len(files), files=files,
            seconds=time.perf_counter() - t0, reused=True,
        )

    # invalidate first, so a crash half-way never leaves a manifest that vouches for partial data
    manifest_path = gt / MANIFEST_NAME
    old_files: list[str] = []
    if manifest_path.exists():
        try:
            old_files = list(json.loads(manifest_path.read_text()).get("files", {}))
        except (OSError, json.JSONDecodeError):
            pass
        manifest_path.unlink()
    raw.mkdir(parents=True, exist_ok=True)
    gt.mkdir(parents=True, exist_ok=True)

    logger.info("generating %s (seed %d) into %s", config.preset, config.seed, out_dir)
    world = build_world(config)
    files_info: dict[str, dict] = {}
    for p in save_world(world, gt):
        files_info[str(p.relative_to(out_dir))] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    samplers = _Samplers(world)
    codebook = _Codebook(world)
    seen = np.zeros(world.n_customers, dtype=bool)
    rows = baskets = 0
    weekly: list[Path] = []
    pending: list[tuple[Path, int, Future]] = []  # compressed weeks being written
    writer = ThreadPoolExecutor(max_workers=1) if compress else None
    for week in tqdm(range(config.n_weeks), desc="generate", unit="week", disable=not progress):
        draw = simulate_week(world, config, week, samplers)
        frame = week_frame(world, draw, codebook)
        code = week_code(week)
        csv = raw / weekly_file_name(code)
        if writer is not None:
            csv = csv.with_name(csv.name + ".gz")
            while len(pending) > 1:  # at most one week queued behind the one being compressed
                _record(files_info, out_dir, *pending.pop(0))
            text = frame.write_csv(float_precision=2).encode()
            pending.append((csv, frame.height, writer.submit(_write_gzip, csv, text)))
        else:
            _atomic(csv, lambda tmp: frame.write_csv(tmp, float_precision=2))
            _record(files_info, out_dir, csv, frame.height, None)
        truth = gt / f"baskets_{code}.parquet"
        _atomic(truth, basket_truth_frame(draw).write_parquet)
        _record(files_info, out_dir, truth, len(draw.basket_id), None)
        seen[draw.basket_customer[draw.basket_customer >= 0]] = True
        rows += frame.height
        baskets += len(draw.basket_id)
        weekly.append(csv)
        logger.debug("week %d: %d baskets, %d rows", code, len(draw.basket_id), frame.height)

    for item in pending:
        _record(files_info, out_dir, *item)
    if writer is not None:
        writer.shutdown()
    # files of an earlier, different generation that this one does not overwrite would be ingested
    for rel in old_files:
        if rel not in files_info and (out_dir / rel).exists():
            (out_dir / rel).unlink()
    totals = {"rows": rows, "baskets": baskets, "customers": int(seen.sum())}
    payload = {
        **_manifest_payload(config),
        "compressed": compress,
        "totals": totals,
        "weekly_files": [str(p.relative_to(out_dir)) for p in weekly],
        "files": files_info,
    }
    _atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    seconds = time.perf_counter() - t0
    logger.info("generated %d rows, %d baskets in %d weeks in %.1f s", rows, baskets, config.n_weeks, seconds)
    return GenerationSummary(
        rows=rows, baskets=baskets, customers=totals["customers"], weeks=config.n_weeks, files=weekly,
        seconds=seconds, reused=False,
    )
